"""mlx-lm backend (Apple Silicon; mlx[cpu] on Linux). mlx imports stay inside the functions.

The base is loaded with `mlx_lm.load` and wrapped with mlx-lm's own LoRA layers (`linear_to_lora_layers`), so
the adapter folder is mlx-lm's format: `mlx_lm.load(base, adapter_path=adapter_dir)` reads it. QLoRA is the same
path on a base that mlx quantised (`mlx_lm.utils.quantize_model`) before the LoRA layers go on.

The training loop is ours, not `mlx_lm.tuner.trainer.train`, because the pipeline needs what that loop lacks:
the assistant-only loss mask of `lorapipe.data.render.encode` (the same mask as the other backends), an LR
schedule per `train.lr_scheduler`, and checkpoints that hold the optimizer state and the data order, so an
interrupted run resumes to the same adapter it would have reached uninterrupted. Task preference (DPO, ORPO) runs
the same loop with mlx-lm-lora's losses as its objective (`lorapipe.backends.mlx_preference`).

Determinism: the data order of epoch `e` is `numpy.random.default_rng([seed, e]).permutation(rows)`, and the
mlx RNG (LoRA dropout) is re-seeded before every optimizer step with a value derived from (seed, step). Both
are functions of the step, which is what makes resume exact.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from lorapipe.backends.base import BackendUnavailable, TrainingTask
from lorapipe.backends.mlx_training import (
    ADAPTER_WEIGHTS,
    CLEAR_CACHE_EVERY,
    Objective,
    SFTObjective,
    StepRunner,
    learning_rate_at,
    make_optimizer,
    resume,
    save_checkpoint,
    total_optimizer_steps,
)
from lorapipe.catalog import BACKENDS
from lorapipe.config import LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.training.adapter import (
    AdapterInfo,
    TrainingRun,
    finish_training,
    run_config,
)

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # beside ADAPTER_WEIGHTS: mlx-lm's adapter folder
# QLoRA on mlx: mlx's affine quantisation (what `mlx_lm convert -q` does), not bitsandbytes' NF4 data type.
QUANTIZATION = {"nf4": {"bits": 4, "group_size": 64, "mode": "affine"},
                "int8": {"bits": 8, "group_size": 64, "mode": "affine"}}


def require_mlx() -> None:
    """Raise BackendUnavailable, with the install command, where mlx / mlx-lm cannot be imported."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable.not_importable("mlx", "mlx and mlx-lm", exc) from None


def _mx_dtype(name: str) -> Any:
    import mlx.core as mx

    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]


# ---------------------------------------------------------------------------------------------- LoRA setup


def lora_keys(model: Any, target_modules: list[str] | str) -> list[str]:
    """The LoRA targets as mlx-lm wants them: paths relative to a transformer block ("self_attn.q_proj").

    `target_modules` holds PEFT-style names ("q_proj") or block-relative paths; "all-linear" = every linear
    layer inside the blocks (like PEFT, the output head is not included).
    """
    import mlx.nn as nn

    linear = (nn.Linear, nn.QuantizedLinear)
    found: set[str] = set()
    for block in model.layers:
        for path, module in block.named_modules():
            if not path or not isinstance(module, linear):
                continue
            if target_modules == "all-linear" or path in target_modules or path.rsplit(".", 1)[-1] in target_modules:
                found.add(path)
    if not found:
        raise ValueError(f"train.lora.target_modules={target_modules!r} matches no linear layer of the model's "
                         "blocks; use names such as q_proj, v_proj or 'all-linear'")
    return sorted(found)


def lora_parameters(lora: LoraSection, keys: list[str]) -> dict:
    """mlx-lm's `lora_parameters`: its `scale` is PEFT's alpha / r (the update is scale * x @ A @ B)."""
    return {"rank": lora.r, "scale": lora.alpha / lora.r, "dropout": lora.dropout, "keys": keys}


def _quantize(model: Any, config: dict, spec: dict) -> tuple[Any, dict]:
    from mlx_lm.utils import quantize_model

    return quantize_model(model, config, group_size=spec["group_size"], bits=spec["bits"], mode=spec["mode"])


def _load_base(name_or_path: str, revision: Optional[str], trust_remote_code: bool, dtype: str,
               quantization: Optional[dict]) -> tuple[Any, dict]:
    """The base exactly as training sees it: loaded by mlx-lm, cast to `dtype`, quantised if QLoRA."""
    import mlx.core as mx
    import mlx_lm

    model, _, config = mlx_lm.load(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                   return_config=True)
    if dtype != "float32":
        model.set_dtype(_mx_dtype(dtype))
    if quantization is not None:
        model, config = _quantize(model, config, quantization)
    mx.eval(model.parameters())
    return model, config


def _use_device(device: str) -> None:
    """mlx's default device for what follows: the plan's `mps` is Apple's GPU, `cpu` the CPU."""
    import mlx.core as mx

    mx.set_default_device(mx.gpu if device == "mps" else mx.cpu)


def _memory_reader(device: str) -> Callable[[], float]:
    """mlx's own peak on Apple's GPU (unified memory); the process RSS on the CPU, as the torch backends report."""
    import mlx.core as mx

    from lorapipe.training.monitoring import process_memory_gib

    return (lambda: mx.get_peak_memory() / 2**30) if device == "mps" else process_memory_gib


def _adapter_config(model_cfg: ModelSection, num_layers: int, params: dict, dtype: str,
                    quantization: Optional[dict]) -> dict:
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        # below: not read by mlx-lm; lets `MLXBackend.load_adapter` / `fuse` rebuild the base training saw
        "model": model_cfg.name_or_path,
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": dtype,
        "base_quantization": quantization,
    }


def _lora_model(m: ModelSection, t: TrainSection, plan: TrainingPlan, seed: int) -> tuple[Any, dict, int, Any]:
    """The base as training sees it (dtype, QLoRA quantisation), frozen, with mlx-lm's LoRA layers on:
    (model, lora parameters, layers, quantisation spec)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    quant = QUANTIZATION.get(plan.quantization)
    model, _ = _load_base(m.name_or_path, m.revision, m.trust_remote_code, plan.dtype, quant)
    model.freeze()
    params = lora_parameters(t.lora, lora_keys(model, t.lora.target_modules))
    num_layers = len(model.layers)
    mx.random.seed(seed)  # LoRA A matrices are drawn from mlx's RNG
    linear_to_lora_layers(model, num_layers, params)
    mx.eval(model.parameters())
    return model, params, num_layers, quant


def _objective(task: TrainingTask, model: Any, tokenizer: Any, m: ModelSection, t: TrainSection, plan: TrainingPlan,
               train: ConversationDataset, pad_id: int, work_dir: Path) -> Objective:
    """What the steps minimise: SFT's masked cross-entropy, or `train.method`'s preference loss. Built before resume
    loads a checkpoint: DPO's reference is the model as it is now, the starting model."""
    if task.spec.name == "preference":
        from lorapipe.backends.mlx_preference import preference_objective

        return preference_objective(model, tokenizer, t, plan, train.records, pad_id, work_dir, m.name_or_path)
    from lorapipe.data.render import encode

    return SFTObjective([(enc.input_ids, enc.assistant_mask)
                         for enc in (encode(tokenizer, rec, plan.max_seq_length) for rec in train.records)], pad_id)


class MLXBackend:
    name = "mlx"

    def train(self, task: TrainingTask, model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval_split: ConversationDataset, work_dir: Path,
              adapter_dir: Path) -> AdapterInfo:
        """Train LoRA (QLoRA if plan.quantization) with mlx, resuming from work_dir/checkpoints if allowed.

        `eval_split` is accepted for the interface and not scored here (train.eval_steps is an hf-only option)."""
        spec = BACKENDS[self.name]
        if task.spec.name not in spec.tasks:  # preflight refuses it; a direct call is told the same
            raise ValueError(f"the mlx backend trains task {', '.join(spec.tasks)}, not "
                             f"{task.spec.name}: {spec.limits_note}")
        if t.method not in spec.methods:
            choices = ", ".join(name for name in spec.methods if name in task.spec.methods)
            raise ValueError(f"train.method={t.method} is not available on the mlx backend; set it to one of "
                             f"{choices}, or train.backend: hf")
        require_mlx()
        import mlx.core as mx
        import numpy as np
        from mlx.utils import tree_flatten

        from lorapipe.training.monitoring import TrainingMonitor

        if len(train) == 0:
            raise ValueError("the training split is empty")
        if plan.quantization not in ("none", *QUANTIZATION):
            raise ValueError(f"plan.quantization={plan.quantization!r} is not one of none, nf4, int8")
        work_dir, adapter_dir = Path(work_dir), Path(adapter_dir)
        _use_device(plan.device)
        random.seed(seed)
        np.random.seed(seed)
        mx.random.seed(seed)
        # the plan's memory budget as mlx's limit: mlx then frees its cache rather than grow into swap
        if plan.memory.budget_gib > 0:
            mx.set_memory_limit(int(plan.memory.budget_gib * 2**30))
        mx.clear_cache()
        mx.reset_peak_memory()

        m = model_cfg
        tokenizer = task.tokenizer(m)
        model, params, num_layers, quant = _lora_model(m, t, plan, seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        objective = _objective(task, model, tokenizer, m, t, plan, train, pad_id, work_dir)
        rows, micro = objective.rows, plan.micro_batch_size
        total_steps = total_optimizer_steps(t, rows, micro, plan.gradient_accumulation_steps)
        per_epoch = math.ceil(rows / micro)

        optimizer = make_optimizer(plan, t)
        optimizer.init(model.trainable_parameters())
        ckpt_dir = work_dir / "checkpoints"
        state, resume_from = resume(t, ckpt_dir, model, optimizer, seed, rows)
        model.train()
        monitor = TrainingMonitor(adapter_dir, _memory_reader(plan.device), run_config(m, t, plan, seed),
                                  eval_metrics=task.spec.progress_metrics)
        monitor.begin(state.step, total_steps)
        step_fn = StepRunner(model, optimizer, plan, seed, objective)
        tokens_this_process = 0
        while state.step < total_steps:
            lr = learning_rate_at(state.step, t, total_steps)
            loss_value, tokens, seconds, grad_norm, metrics = step_fn(state, lr)
            tokens_this_process += tokens
            state.step += 1
            if state.step % CLEAR_CACHE_EVERY == 0:  # as the seed MLX notes: free the buffer cache every few steps
                mx.clear_cache()
            state.micro_batches_consumed += plan.gradient_accumulation_steps
            state.loss_sum += loss_value
            state.train_tokens += tokens
            state.train_seconds += seconds
            state.log_window.append([loss_value, tokens, seconds])
            state.metric_window.append(metrics)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                window = state.log_window
                # the objective's metrics (preference: TRL's reward margin and accuracy), means over the window
                window_metrics = {k: sum(w[k] for w in state.metric_window) / len(state.metric_window)
                                  for k in state.metric_window[-1]}
                entry = {"step": state.step, "epoch": state.epoch(per_epoch),
                         "loss": sum(w[0] for w in window) / len(window), "learning_rate": lr,
                         "tokens_per_second": sum(w[1] for w in window) / max(sum(w[2] for w in window), 1e-9),
                         "train_tokens": state.train_tokens, **window_metrics}
                state.log_history.append(entry)
                monitor.log(state.step, loss=entry["loss"], learning_rate=lr, grad_norm=grad_norm.item(),
                            epoch=entry["epoch"], tokens_seen=tokens_this_process, eval_metrics=window_metrics)
                state.log_window, state.metric_window = [], []
            if state.step % t.save_steps == 0 or state.step == total_steps:
                state.mark_checkpoint(seed, rows, total_steps, per_epoch, micro)
                save_checkpoint(ckpt_dir, state.step, model, optimizer, asdict(state), t.save_total_limit)
                monitor.checkpoint_saved(state.step)
        monitor.end()

        model.eval()
        mx.clear_cache()  # between phases: training's buffers are not needed to save, evaluate or fuse

        def save_weights(folder: Path) -> None:
            mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
            (folder / ADAPTER_CONFIG).write_text(json.dumps(
                _adapter_config(m, num_layers, params, plan.dtype, quant), indent=2))

        run = TrainingRun(
            backend=self.name, steps=state.step, train_loss=state.loss_sum / state.step if state.step else None,
            train_tokens=int(state.train_tokens), train_seconds=state.train_seconds,
            peak_memory_gib=round(monitor.memory_gib(), 4),
            resumed_from=str(resume_from) if resume_from else None, log_history=state.log_history)
        return finish_training(run, adapter_dir, m, t, seed, plan, train, tokenizer, save_weights,
                               extra={"adapter_format": spec.adapter_format, **objective.metadata})

    def eval_models(self, adapter_dir: str, phase: PhasePlan) -> dict[str, Any]:
        """The base as saved and a float32 fused copy, both scored with transformers like any other adapter."""
        import contextlib
        import tempfile

        from lorapipe.models.loading import load_model

        cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())

        @contextlib.contextmanager
        def tuned() -> Any:
            scratch = tempfile.mkdtemp(prefix="lorapipe-eval-fused-")
            try:  # a scoring copy only; the merge step writes the real one
                fused = self.fuse(adapter_dir, scratch, "float32", device=phase.device)
                yield load_model(fused, phase.dtype, device=phase.device)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

        return {"base": lambda: contextlib.nullcontext(load_model(cfg["model"], phase.dtype, cfg.get("revision"),
                                                                  cfg.get("trust_remote_code", False),
                                                                  device=phase.device)),
                "tuned": tuned}

    def merge(self, adapter_dir: str, out_dir: str, phase: PhasePlan) -> None:
        self.fuse(adapter_dir, out_dir, phase.dtype, device=phase.device)

    def reference_logits(self, adapter_dir: str, phase: PhasePlan) -> Any:
        """ids -> float32 logits of the adapter on the base as training saw it, computed by mlx."""
        import mlx.core as mx
        import numpy as np
        import torch

        model, _ = self.load_adapter(adapter_dir, device=phase.device)
        return lambda ids: torch.from_numpy(np.array(model(mx.array(ids.numpy())).astype(mx.float32)))

    def load_adapter(self, adapter_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
        """(mlx model, HF tokenizer): the base as training saw it (dtype, quantisation) with the adapter on, on the
        phase's device (mps: Apple's GPU; cpu, as the merge plan has it).

        `mlx_lm.load(base, adapter_path=adapter_dir)` also reads the adapter, but on the unquantised base: for
        a QLoRA adapter this is the faithful way to run it.
        """
        require_mlx()
        from mlx_lm.tuner.utils import load_adapters
        from transformers import AutoTokenizer

        _use_device(device)
        adapter_dir = Path(adapter_dir)
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        model, _ = _load_base(cfg["model"], cfg.get("revision"), cfg.get("trust_remote_code", False),
                              cfg.get("dtype", "float32"), cfg.get("base_quantization"))
        model = load_adapters(model, str(adapter_dir))
        model.eval()
        return model, AutoTokenizer.from_pretrained(str(adapter_dir))

    def fuse(self, adapter_dir: str, out_dir: str, dtype: str = "float32", device: str = "cpu") -> str:
        """Fold the adapter into the base and save a folder `transformers.AutoModelForCausalLM` loads.

        mlx-lm's fuse logic (LoRA layer `.fuse(dequantize=True)`, then `dequantize_model`): a QLoRA base comes
        out dequantised, holding the weights training actually saw plus the LoRA update. Weights are saved as
        safetensors in `dtype`, with the base's config (quantisation keys dropped) and the adapter's tokenizer.
        """
        require_mlx()
        import mlx.core as mx
        from mlx.utils import tree_unflatten
        from mlx_lm.utils import dequantize_model, load_config, save_config, save_model

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"fuse dtype {dtype!r} is not one of float32, bfloat16, float16")
        adapter_dir, out = Path(adapter_dir), Path(out_dir)
        model, tokenizer = self.load_adapter(adapter_dir, device)
        fused = [(n, mod.fuse(dequantize=True)) for n, mod in model.named_modules() if hasattr(mod, "fuse")]
        if fused:
            model.update_modules(tree_unflatten(fused))
        model = dequantize_model(model)
        model.set_dtype(_mx_dtype(dtype))
        mx.eval(model.parameters())

        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        base = Path(cfg["model"])
        if not base.exists():  # a hub id: its config files, from the cache mlx_lm.load filled (or the hub)
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(cfg["model"], revision=cfg.get("revision"),
                                          allow_patterns=["config.json", "generation_config.json"]))
        config = load_config(base)
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
        out.mkdir(parents=True, exist_ok=True)
        save_model(out, model, donate_model=False)
        save_config(config, out / "config.json")
        tokenizer.save_pretrained(str(out))
        if (base / "generation_config.json").exists():
            shutil.copy(base / "generation_config.json", out / "generation_config.json")
        (out / "lorapipe_fused.json").write_text(json.dumps(
            {"base_model": cfg["model"], "adapter": str(adapter_dir), "dtype": dtype, "fused_by": "mlx-lm",
             "base_quantization": cfg.get("base_quantization")}, indent=2))
        log.info("fused %s into %s", adapter_dir, out)
        return str(out)
