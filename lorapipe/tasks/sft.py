"""task: sft, instruction/chat fine-tuning of a causal LM.

- **rows**: conversations (alpaca, messages, sharegpt, prompt/completion, text), rendered with the model's chat
  template; the loss is on the assistant's tokens only (`lorapipe.data.render.encode`, the mask validation audits);
- **model**: `AutoModelForCausalLM`, LoRA through PEFT (`task_type=CAUSAL_LM`), QLoRA with a bitsandbytes config;
  `train.init_adapter` continues an existing adapter instead;
- **trainer**: TRL's `SFTTrainer`; `train.packing` packs rows padding-free (TRL's best-fit decreasing bins), each bin
  kept a row of its own (`PackedRowsCollator`), or `train.group_by_length` batches similar lengths;
- **evaluation**: base and tuned on the same held-out rows: masked loss and perplexity, then greedy generations
  scored with exact match, ROUGE-L, BLEU and chrF, the learned-to-stop rate and the overshoot
  (`lorapipe.evaluation.metrics`); promoted by perplexity unless register.primary_metric says otherwise;
- **merge check**: the merged causal LM's logits at every position against base + adapter, and how often both pick
  the same next token; the merged folder gets a generation config listing every end token and an Ollama Modelfile.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from lorapipe.backends.base import PreparedData
from lorapipe.catalog import TASKS
from lorapipe.config import EvaluateSection, LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.evaluation.merge_check import (
    COMPARE_POSITIONS,
    MergeCheck,
    ReferenceLogits,
)
from lorapipe.evaluation.metrics import (
    BaseScores,
    EvalMetrics,
    EvaluationError,
    ModelScores,
    generate_scores,
    masked_loss,
)
from lorapipe.hardware.plan import PhasePlan, TrainingPlan

log = logging.getLogger(__name__)


def tokenize_dataset(dataset: ConversationDataset, tokenizer: Any, max_length: int) -> Any:
    """A `datasets.Dataset` of input_ids + labels (-100 outside assistant turns), truncated to max_length."""
    from datasets import Dataset

    from lorapipe.data.render import encode
    from lorapipe.progress import progress

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for rec in progress(dataset.records, f"tokenizing {dataset.name}"):
        enc = encode(tokenizer, rec, max_length)
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append([t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_mask)])
    return Dataset.from_dict(rows)


def lora_config(lora: LoraSection, new_tokens: Optional[list[int]] = None, tied: bool = True) -> Any:
    """LoRA as configured; with `new_tokens` (a built-in chat template's special tokens, added to the vocabulary)
    their embedding rows train too (PEFT's trainable tokens), and the output rows of an untied lm_head, or the model
    could read them but never write them (the turn end it must learn to stop on among them)."""
    from peft import LoraConfig

    trainable = None
    if new_tokens:
        trainable = {"embed_tokens": list(new_tokens)} if tied else {"embed_tokens": list(new_tokens),
                                                                      "lm_head": list(new_tokens)}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM", trainable_token_indices=trainable)


def new_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokens a built-in chat template added to the tokenizer (none for the others)."""
    added = getattr(tokenizer, "lorapipe_added_tokens", None) or []
    return [int(i) for i in tokenizer.convert_tokens_to_ids(added)] if added else []


def ties_embeddings(model: Any) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", True))


class PackedRowsCollator:
    """Packed rows kept as rows. TRL's BFD packing flattens a micro-batch of packs into one sequence ([1, B x L]): with
    FlashAttention that is varlen attention, but sdpa and eager then attend over all B x L positions under a
    block-diagonal mask, B times the work of the packs themselves (measured: packing slower than naive padding on the
    CPU). Here each pack stays a row ([B, L], right-padded to the longest pack), position ids restart at every packed
    sequence and there is no attention mask: transformers builds each row's block-diagonal causal mask from the
    position ids (masking_utils.find_packed_sequence_indices), so rows never attend across each other."""

    def __init__(self, inner: Any, pad_token_id: int) -> None:
        self.inner, self.pad_token_id = inner, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from lorapipe.backends.trainer import REAL_TOKENS

        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        if "seq_lengths" in examples[0]:
            positions = self.inner.get_position_ids_from_packed_seq_lengths([e["seq_lengths"] for e in examples])
        else:
            positions = [torch.arange(n) for n in lengths]
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
        position_ids = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, (example, n) in enumerate(zip(examples, lengths)):
            ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]))
            position_ids[row, :n] = positions[row]
            # the padding after a pack: positions restarting at 0, so it is a sequence of its own (labels -100), which
            # attends neither into the pack nor from it
            position_ids[row, n:] = torch.arange(longest - n)
        labels[position_ids == 0] = -100  # a sequence's first token is not predicted from the one before it
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids, REAL_TOKENS: sum(lengths)}


def init_adapter_folder(t: TrainSection, m: ModelSection) -> Optional[Path]:
    """`train.init_adapter`: the PEFT adapter folder training continues, checked; None when unset."""
    if not t.init_adapter:
        return None
    path = Path(t.init_adapter).expanduser().resolve()
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"train.init_adapter: {path} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    base = cfg.get("base_model_name_or_path")
    if base and base != m.name_or_path:
        log.warning("train.init_adapter %s was trained on %s, continuing it on %s", path, base, m.name_or_path)
    if cfg.get("r") != t.lora.r or cfg.get("lora_alpha") != t.lora.alpha:
        log.info("note: train.init_adapter keeps its own LoRA shape (r=%s, alpha=%s); train.lora is not applied",
                 cfg.get("r"), cfg.get("lora_alpha"))
    return path


# -------------------------------------------------------------------------------------------------------- evaluation


def _rows(test: ConversationDataset, max_samples: int, generation_samples: int) -> tuple[list[Record], list[Record]]:
    """The rows scored for loss and the rows generated: the first of the test split, so every model scored on a
    split sees the same ones."""
    scored = test.records[:max_samples]
    if not scored:
        raise ValueError("the test split is empty: raise split.test_fraction or add data")
    return scored, test.records[:generation_samples]


def _score_model(model: Any, tokenizer: Any, scored: list[Record], generated: list[Record], phase: PhasePlan,
                 max_new_tokens: int, seed: int,
                 metrics: Iterable[str]) -> tuple[ModelScores, int, list[Optional[float]], list[dict]]:
    """One model's scores, the tokens scored, its per-row losses and its generations."""
    max_length = phase.max_seq_length
    loss, tokens, row_losses = masked_loss(model, tokenizer, scored, max_length, phase.batch_size)
    if tokens == 0:
        raise EvaluationError(f"none of the {len(scored)} test rows scored has an answer token within "
                              f"train.max_seq_length={max_length} (prompts longer than the limit): raise "
                              "train.max_seq_length, or shorten the prompts")
    gscores, generations = (generate_scores(model, tokenizer, generated, max_new_tokens, phase.batch_size, seed,
                                            metrics) if generated else ({}, []))
    return ModelScores(loss=loss, perplexity=math.exp(min(loss, 50.0)), **gscores), tokens, row_losses, generations


def _generation_settings(tokenizer: Any, max_new_tokens: int, batch_size: int, seed: int) -> dict[str, Any]:
    from lorapipe.data.end_tokens import end_tokens

    return {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "greedy": True, "seed": seed,
            "padding": "left", "end_tokens": end_tokens(tokenizer)}


class SFT:
    """task: sft (see the module docstring)."""

    spec = TASKS["sft"]

    # ---------------------------------------------------------------------------------------------------- training

    def tokenizer(self, m: ModelSection) -> Any:
        from lorapipe.models.loading import load_tokenizer

        # the project's tokenizer (chat template override, pad token): rendering and masking match validation,
        # evaluation and merge exactly, whichever backend trains
        return load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code, m.chat_template, m.chat_template_kwargs)

    def tokenize(self, dataset: ConversationDataset, tokenizer: Any, plan: TrainingPlan) -> Any:
        return tokenize_dataset(dataset, tokenizer, plan.max_seq_length)

    def prepare(self, m: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                train: ConversationDataset, eval_split: ConversationDataset) -> PreparedData:
        init_adapter = init_adapter_folder(t, m)
        return PreparedData(train=self.tokenize(train, tokenizer, plan),
                            eval=self.tokenize(eval_split, tokenizer, plan) if len(eval_split) else None,
                            rows=train, facts={"init_adapter": init_adapter})

    def load_model(self, m: ModelSection, t: TrainSection, plan: TrainingPlan, tokenizer: Any, data: PreparedData,
                   device: str) -> Any:
        """The causal LM on the plan's device and dtype (quantised for QLoRA); the adapter of train.init_adapter on
        it, trainable. LoRA layers are added by the trainer (`peft_config`)."""
        from lorapipe.models.loading import load_model

        model = load_model(m.name_or_path, plan.dtype, m.revision, m.trust_remote_code, plan.quantization,
                           device=device, attn_implementation=m.attn_implementation, vocab_rows=len(tokenizer))
        if plan.quantization != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
        if data.facts["init_adapter"] is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(data.facts["init_adapter"]), is_trainable=True)
        return model

    def trainer(self, model: Any, arguments: dict[str, Any], t: TrainSection, plan: TrainingPlan, tokenizer: Any,
                data: PreparedData, callbacks: list[Any]) -> Any:
        from trl import SFTConfig, SFTTrainer

        from lorapipe.backends.trainer import trainer_class

        if t.packing:
            # Padding-free batches carry position ids and no attention mask; transformers turns restarting position
            # ids into a block-diagonal causal mask (sdpa/eager/flex) or varlen kernels (flash), provided no KV cache.
            model.config.use_cache = False
            impl = str(getattr(model.config, "_attn_implementation", None))
            if impl not in ("sdpa", "eager", "flex_attention") and "flash" not in impl:
                log.warning("train.packing with attention implementation %r: rows may attend across each other unless "
                            "the model builds its mask from position ids", impl)
        # chunked_nll named, not left to TRL's default: the memory model counts its chunk (the catalog's
        # sft_loss_chunk_tokens), not the batch's full logits
        new_tokens, tied = new_token_ids(tokenizer), ties_embeddings(model)
        # chunked_nll projects through lm_head's weight itself, which PEFT's trainable tokens wrap on an untied head:
        # then the model's own loss (the memory model counts full logits for it)
        args = SFTConfig(**arguments, max_length=plan.max_seq_length, packing=t.packing, packing_strategy="bfd",
                         padding_free=t.packing, loss_type="nll" if new_tokens and not tied else "chunked_nll")
        init_adapter = data.facts["init_adapter"]
        trainer = trainer_class(SFTTrainer)(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                            processing_class=tokenizer,
                                            peft_config=None if init_adapter is not None else lora_config(
                                                t.lora, new_tokens, tied),
                                            callbacks=callbacks)
        if t.packing and "flash" not in str(getattr(model.config, "_attn_implementation", "")):
            trainer.data_collator = PackedRowsCollator(trainer.data_collator, tokenizer.pad_token_id)
        return trainer

    def announce(self, model: Any, plan: TrainingPlan, data: PreparedData) -> None:
        """Nothing beyond the plan's lines: the progress line says the rest."""

    def train_tokens(self, trainer: Any, data: PreparedData, t: TrainSection, plan: TrainingPlan) -> int:
        from lorapipe.backends.trainer import train_tokens

        return train_tokens(data.train, t, plan)

    def metadata(self, trainer: Any, t: TrainSection, plan: TrainingPlan, data: PreparedData,
                 evaluating: bool) -> dict[str, Any]:
        state = trainer.state
        extra: dict[str, Any] = {
            "batching": {"group_by_length": t.group_by_length, "packing": t.packing,
                         "packing_strategy": "bfd" if t.packing else None},
            "init_adapter": str(data.facts["init_adapter"]) if data.facts["init_adapter"] else None,
        }
        if t.eval_steps:
            extra["evaluation"] = {
                "eval_steps": t.eval_steps, "best_eval_loss": state.best_metric,
                "best_checkpoint": state.best_model_checkpoint,
                "stopped_early": bool(t.early_stopping_patience) and state.global_step < state.max_steps,
                "loaded_best_model": t.load_best_model_at_end,
            }
        return extra

    def after_training(self, m: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan, tokenizer: Any,
                       data: PreparedData, work_dir: Path, adapter_dir: Path, is_main: bool) -> None:
        """Nothing: the adapter is the whole result."""

    def checkpoint_files(self, plan: TrainingPlan, world_size: int) -> tuple[str, ...]:
        from lorapipe.backends.trainer import checkpoint_files

        return checkpoint_files(world_size)

    # -------------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, adapter_dir: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                 seed: int = 0, chat_template: Optional[str] = None, base: Optional[BaseScores] = None) -> EvalMetrics:
        """Score the base and base+adapter on the same test rows with transformers, on the evaluate phase's device,
        dtype and batch size (loss batches and generation batches alike); the backend that trained the adapter
        provides the two models (a PEFT adapter toggled off and on, an mlx-lm adapter fused). `base`: the base's
        scores from `score_base` on the same rows and settings, used instead of scoring it again."""
        from lorapipe.backends import get_backend
        from lorapipe.models.loading import load_tokenizer
        from lorapipe.training.adapter import backend_of
        from lorapipe.training.monitoring import PhaseMemory

        scored, generated = _rows(test, evaluate.max_samples, evaluate.generation_samples)
        metrics = list(evaluate.generation_metrics)
        tokenizer = load_tokenizer(adapter_dir, chat_template=chat_template)
        results: dict[str, ModelScores] = {}
        generations: dict[str, list[dict]] = {}
        row_losses: dict[str, list[Optional[float]]] = {}
        tokens = 0
        with PhaseMemory(phase.device) as memory:
            models = get_backend(backend_of(adapter_dir)).eval_models(adapter_dir, phase)
            for label, enter in models.items():
                if label == "base" and base is not None:
                    continue
                with enter() as model:
                    results[label], tokens, row_losses[label], generations[label] = _score_model(
                        model, tokenizer, scored, generated, phase, evaluate.max_new_tokens, seed, metrics)
            if base is not None and (base.scored_tokens != tokens
                                     or len(base.generations) != len(generations.get("tuned", []))):
                # another tokenizer or template than the adapter's: the base's figures are not of these tokens
                log.warning("the base's stored scores cover %d tokens and %d generations, the adapter's rows %d and "
                            "%d (another tokenizer or chat template): scoring the base again", base.scored_tokens,
                            len(base.generations), tokens, len(generations.get("tuned", [])))
                with models["base"]() as model:
                    results["base"], _, row_losses["base"], generations["base"] = _score_model(
                        model, tokenizer, scored, generated, phase, evaluate.max_new_tokens, seed, metrics)
            elif base is not None:
                results["base"], row_losses["base"], generations["base"] = (base.scores, base.row_losses,
                                                                            base.generations)
        # side by side: the same rows, generated by base and tuned
        samples = [{"source": t["source"], "prompt": t["prompt"], "reference": t["reference"],
                    "base": b["prediction"], "base_stopped": b["stopped"], "base_new_tokens": b["new_tokens"],
                    "tuned": t["prediction"], "tuned_stopped": t["stopped"], "tuned_new_tokens": t["new_tokens"]}
                   for b, t in zip(generations.get("base", []), generations.get("tuned", []))]
        gain = (results["base"].perplexity - results["tuned"].perplexity) / results["base"].perplexity
        return EvalMetrics(test_rows=len(test), scored_rows=len(scored), generated_rows=len(samples),
                           scored_tokens=tokens, base=results["base"], tuned=results["tuned"], perplexity_gain=gain,
                           tuned_beats_base=results["tuned"].perplexity < results["base"].perplexity, samples=samples,
                           row_losses={k: row_losses[k] for k in ("base", "tuned")}, memory_gib=memory.peak_gib,
                           memory_at_start_gib=memory.start_gib,
                           generation=_generation_settings(tokenizer, evaluate.max_new_tokens, phase.batch_size,
                                                           seed))

    def score_base(self, m: ModelSection, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                   seed: int = 0) -> BaseScores:
        """The untuned base alone, scored exactly as `evaluate` scores it beside an adapter (the project's tokenizer,
        the same rows, device, dtype, batch size, seed and end tokens), for `evaluate(base=...)`."""
        from lorapipe.models.loading import load_model
        from lorapipe.training.monitoring import PhaseMemory, free_memory

        scored, generated = _rows(test, evaluate.max_samples, evaluate.generation_samples)
        tokenizer = self.tokenizer(m)
        with PhaseMemory(phase.device) as memory:
            model = load_model(m.name_or_path, phase.dtype, m.revision, m.trust_remote_code, device=phase.device,
                               vocab_rows=len(tokenizer))
            if model.config.pad_token_id is None:  # as the adapter's base is loaded (peft_adapter.load_base)
                model.config.pad_token_id = tokenizer.pad_token_id
            try:
                scores, tokens, row_losses, generations = _score_model(
                    model, tokenizer, scored, generated, phase, evaluate.max_new_tokens, seed,
                    evaluate.generation_metrics)
            finally:
                del model
                free_memory(phase.device)
        return BaseScores(model=m.name_or_path, revision=m.revision, scores=scores, scored_tokens=tokens,
                          row_losses=row_losses, generations=generations, memory_gib=memory.peak_gib,
                          memory_at_start_gib=memory.start_gib)

    def score_folder(self, folder: str, test: ConversationDataset, phase: PhasePlan, evaluate: EvaluateSection,
                     seed: int = 0, chat_template: Optional[str] = None) -> tuple[ModelScores, list[dict]]:
        """Score a merged (plain transformers) model folder, e.g. the stage holder, exactly as `evaluate` scores base
        and tuned: the same test rows (evaluate.max_samples for loss, evaluate.generation_samples generated), the
        phase's device, dtype and batch size, greedy generation with the same seed and end tokens. Returns its scores
        and its generations (source, prompt, reference, prediction, stopped, new_tokens)."""
        from lorapipe.models.loading import load_model, load_tokenizer
        from lorapipe.training.monitoring import free_memory

        scored, generated = _rows(test, evaluate.max_samples, evaluate.generation_samples)
        tokenizer = load_tokenizer(folder, chat_template=chat_template)
        model = load_model(folder, phase.dtype, device=phase.device)
        try:
            scores, _, _, generations = _score_model(model, tokenizer, scored, generated, phase,
                                                     evaluate.max_new_tokens, seed, evaluate.generation_metrics)
        finally:
            del model
            free_memory(phase.device)
        return scores, generations

    # ------------------------------------------------------------------------------------------------------- merge

    def check_inputs(self, tokenizer: Any, rows: list[Record], max_length: int) -> list[Any]:
        """Each check row's token ids, rendered and truncated as training saw it."""
        import torch

        from lorapipe.data.render import encode

        return [torch.tensor([encode(tokenizer, rec, max_length).input_ids]) for rec in rows]

    def compare_merged(self, folder: str | Path, inputs: list[Any], reference: ReferenceLogits, phase: PhasePlan,
                       tolerance: float) -> MergeCheck:
        """Reload the saved folder in the merge dtype and compare its logits with the reference: max and mean
        absolute difference, and how often both pick the same greedy token."""
        import torch
        from transformers import AutoModelForCausalLM

        from lorapipe.backends.peft_adapter import release_memory
        from lorapipe.models.loading import torch_dtype

        reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype(phase.dtype)).to(phase.device)
        reloaded.eval()
        max_diff, diff_sum, agree, positions = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for row, ids in enumerate(inputs):
                got = reloaded(input_ids=ids.to(phase.device), use_cache=False).logits.cpu()
                # a few positions at a time: float32 copies of whole [positions x vocab] logits would cost more than
                # the logits themselves
                for start, ref in zip(range(0, got.shape[1], COMPARE_POSITIONS),
                                      reference.slices(row, COMPARE_POSITIONS)):
                    r = ref.float()
                    g = got[0, start:start + COMPARE_POSITIONS].float()
                    agree += int((r.argmax(-1) == g.argmax(-1)).sum())
                    d = r.sub_(g).abs_()
                    max_diff = max(max_diff, float(d.max()))
                    diff_sum += float(d.sum()) / d.shape[1]
                    positions += d.shape[0]
                del got
        del reloaded
        release_memory(phase.device)
        return MergeCheck(dtype=phase.dtype, max_abs_logit_diff=max_diff, mean_abs_logit_diff=diff_sum / positions,
                          tolerance=tolerance, passed=max_diff <= tolerance, rows_checked=len(inputs),
                          greedy_agreement=agree / positions, positions_checked=positions)

    def serving_files(self, folder: Path, tokenizer: Any) -> tuple[list[str], Optional[str], str]:
        """A generation config that stops at every end token, and an Ollama Modelfile: (end tokens, the Modelfile's
        chat family or None, its note)."""
        from lorapipe.data.end_tokens import end_tokens
        from lorapipe.export.generation_config import write_generation_config
        from lorapipe.export.modelfile import write_modelfile

        write_generation_config(folder, tokenizer)
        ends = end_tokens(tokenizer)
        modelfile = write_modelfile(folder, tokenizer, ends)
        if modelfile.family is None:
            log.info("Ollama Modelfile written without TEMPLATE: %s", modelfile.note)
        return ends, modelfile.family, modelfile.note


