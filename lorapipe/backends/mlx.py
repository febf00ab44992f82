"""mlx-lm backend (Apple Silicon; mlx[cpu] on Linux). mlx imports stay inside the functions.

The base is loaded with `mlx_lm.load` and wrapped with mlx-lm's own LoRA layers (`linear_to_lora_layers`), so
the adapter folder is mlx-lm's format: `mlx_lm.load(base, adapter_path=adapter_dir)` reads it. QLoRA is the same
path on a base that mlx quantised (`mlx_lm.utils.quantize_model`) before the LoRA layers go on.

The training loop is ours, not `mlx_lm.tuner.trainer.train`, because the pipeline needs what that loop lacks:
the assistant-only loss mask of `lorapipe.data.render.encode` (the same mask as the other backends), an LR
schedule per `train.lr_scheduler`, and checkpoints that hold the optimizer state and the data order, so an
interrupted run resumes to the same adapter it would have reached uninterrupted.

Determinism: the data order of epoch `e` is `numpy.random.default_rng([seed, e]).permutation(rows)`, and the
mlx RNG (LoRA dropout) is re-seeded before every optimizer step with a value derived from (seed, step). Both
are functions of the step, which is what makes resume exact.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from lorapipe.backends.base import (
    AdapterInfo,
    BackendUnavailable,
    TrainingRun,
    complete_checkpoints,
    finish_training,
    latest_complete_checkpoint,
    resume_checkpoint,
    run_config,
)
from lorapipe.catalog import BACKENDS
from lorapipe.config import LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan, TrainingPlan

ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's names, read by mlx_lm.load(..., adapter_path=)
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"
# QLoRA on mlx: mlx's affine quantisation (what `mlx_lm convert -q` does), not bitsandbytes' NF4 data type.
QUANTIZATION = {"nf4": {"bits": 4, "group_size": 64, "mode": "affine"},
                "int8": {"bits": 8, "group_size": 64, "mode": "affine"}}
CLEAR_CACHE_EVERY = 10
INSTALL_HINT = BACKENDS["mlx"].install


def require_mlx() -> None:
    """Raise BackendUnavailable, with the install command, where mlx / mlx-lm cannot be imported."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"train.backend=mlx needs mlx and mlx-lm, which cannot be imported here ({exc}); install with: "
            f"{INSTALL_HINT}, or set train.backend: hf"
        ) from None


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


# ------------------------------------------------------------------------------------ schedule and batches


def learning_rate_at(step: int, t: TrainSection, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based), the same formulas as transformers' schedulers."""
    warmup = t.warmup_steps
    if t.lr_scheduler == "constant":
        return t.learning_rate
    if step < warmup:
        return t.learning_rate * step / max(1, warmup)
    if t.lr_scheduler == "constant_with_warmup":
        return t.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    if t.lr_scheduler == "cosine":
        return t.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return t.learning_rate * max(0.0, 1.0 - progress)  # linear


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a pure function of (seed, epoch), so resume needs only the cursor."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(rows)]


def micro_batch_rows(cursor: int, rows: int, micro: int, seed: int) -> tuple[int, list[int]]:
    """(epoch, row indices) of the `cursor`-th micro-batch of the run; the last one of an epoch may be short."""
    per_epoch = math.ceil(rows / micro)
    epoch, k = divmod(cursor, per_epoch)
    return epoch, epoch_order(rows, seed, epoch)[k * micro:(k + 1) * micro]


def total_optimizer_steps(t: TrainSection, rows: int, micro: int, accum: int) -> int:
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.epochs * math.ceil(rows / micro) / accum))


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any, int, int]:
    """(inputs, targets, loss mask, trained tokens, real tokens) of one right-padded micro-batch.

    Causal shift: position i predicts token i+1, which is trained where its assistant mask is 1. Padding sits
    after the real tokens, so the causal attention of real positions never sees it; its loss mask is 0.
    """
    import mlx.core as mx
    import numpy as np

    width = max(max(len(ids) - 1 for ids, _ in encoded), 1)
    inputs = np.full((len(encoded), width), pad_id, dtype=np.int32)
    targets = np.full((len(encoded), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(encoded), width), dtype=np.float32)
    real = 0
    for row, (ids, amask) in enumerate(encoded):
        n = len(ids) - 1
        real += len(ids)
        if n <= 0:
            continue
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        mask[row, :n] = amask[1:]
    return mx.array(inputs), mx.array(targets), mx.array(mask), int(mask.sum()), real


def masked_loss(model: Any, inputs: Any, targets: Any, mask: Any, denominator: Any) -> Any:
    """Summed cross-entropy over trained tokens / the trained tokens of the whole optimizer step."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (ce * mask).sum() / denominator


# -------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (`step-N/` holding trainer_state.json), oldest first."""
    return [p for p in complete_checkpoints(folder) if p.name.startswith(CHECKPOINT_PREFIX)]


def _save_checkpoint(folder: Path, step: int, model: Any, optimizer: Any, state: dict, keep: int) -> Path:
    """Write step-N/ (adapter weights, optimizer state, trainer/RNG/data-order state) and prune the oldest.

    Written to a temporary folder and renamed, so a crash mid-save never leaves a checkpoint that looks whole.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / OPTIMIZER_STATE), dict(tree_flatten(optimizer.state)))
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model: Any, optimizer: Any) -> dict:
    """Restore adapter weights and optimizer state in place; return the trainer state."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(list(mx.load(str(path / ADAPTER_WEIGHTS)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_STATE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / TRAINER_STATE).read_text())


def _make_optimizer(plan: TrainingPlan, t: TrainSection) -> Any:
    """The catalog's mlx optimizers; preflight refuses the others, so nothing is swapped here."""
    import mlx.optimizers as optim

    if plan.optimizer == "sgd":
        return optim.SGD(learning_rate=t.learning_rate, weight_decay=t.weight_decay)
    if plan.optimizer == "adamw_torch":  # bias_correction=True is torch's AdamW
        return optim.AdamW(learning_rate=t.learning_rate, weight_decay=t.weight_decay, bias_correction=True)
    raise ValueError(f"train.optimizer={plan.optimizer} is not available on the mlx backend "
                     f"(allowed: {', '.join(BACKENDS['mlx'].optimizers)}); preflight refuses it")


def _use_device(device: str) -> None:
    """mlx's default device for what follows: the plan's `mps` is Apple's GPU, `cpu` the CPU."""
    import mlx.core as mx

    mx.set_default_device(mx.gpu if device == "mps" else mx.cpu)


def _memory_reader(device: str) -> Callable[[], float]:
    """mlx's own peak on Apple's GPU (unified memory); the process RSS on the CPU, as the torch backends report."""
    import mlx.core as mx

    from lorapipe.training.monitoring import process_memory_gb

    return (lambda: mx.get_peak_memory() / 2**30) if device == "mps" else process_memory_gb


def _grad_norm(grads: Any) -> Any:
    """The global L2 norm of the step's gradient, as the Trainer logs it (an mlx scalar, read once at log time)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**32


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


class MLXBackend:
    name = "mlx"

    def train(self, model_cfg: ModelSection, t: TrainSection, seed: int, plan: TrainingPlan,
              train: ConversationDataset, eval: ConversationDataset, work_dir: Path,  # noqa: A002
              adapter_dir: Path) -> AdapterInfo:
        """Train LoRA (QLoRA if plan.quantization) with mlx, resuming from work_dir/checkpoints if allowed.

        `eval` is accepted for the interface and not scored here, as in the HF backend (eval_strategy "no").
        """
        require_mlx()
        import mlx.core as mx
        import mlx.nn as nn
        import numpy as np
        from mlx.utils import tree_flatten, tree_map
        from mlx_lm.tuner.utils import linear_to_lora_layers

        from lorapipe.data.render import encode
        from lorapipe.models.loading import load_tokenizer
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
        if plan.memory.budget_gb > 0:
            mx.set_memory_limit(int(plan.memory.budget_gb * 2**30))
        mx.clear_cache()
        mx.reset_peak_memory()

        m = model_cfg
        tokenizer = load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code, m.chat_template)
        quant = QUANTIZATION.get(plan.quantization)
        model, _ = _load_base(m.name_or_path, m.revision, m.trust_remote_code, plan.dtype, quant)
        model.freeze()
        keys = lora_keys(model, t.lora.target_modules)
        params = lora_parameters(t.lora, keys)
        num_layers = len(model.layers)
        mx.random.seed(seed)  # LoRA A matrices are drawn from mlx's RNG
        linear_to_lora_layers(model, num_layers, params)
        mx.eval(model.parameters())

        encoded = []
        for rec in train.records:
            enc = encode(tokenizer, rec, plan.max_seq_length)
            encoded.append((enc.input_ids, enc.assistant_mask))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows, micro, accum = len(encoded), plan.micro_batch_size, plan.gradient_accumulation_steps
        total_steps = total_optimizer_steps(t, rows, micro, accum)

        optimizer = _make_optimizer(plan, t)
        optimizer.init(model.trainable_parameters())
        ckpt_dir = work_dir / "checkpoints"
        state = {"step": 0, "micro_batches_consumed": 0, "loss_sum": 0.0, "train_tokens": 0, "train_seconds": 0.0,
                 "log_history": [], "log_window": []}
        # the newest checkpoint whose files all read back; a newer one cut short is named and set aside
        own = latest_complete_checkpoint(ckpt_dir, (ADAPTER_WEIGHTS, OPTIMIZER_STATE, TRAINER_STATE),
                                         CHECKPOINT_PREFIX) if t.resume else None
        resume_from = resume_checkpoint(own, t)
        if not t.resume and ckpt_dir.exists():
            print(f"train.resume=false: removing the checkpoints of an earlier run in {ckpt_dir}", flush=True)
            shutil.rmtree(ckpt_dir)
        if resume_from is not None:
            state = _load_checkpoint(resume_from, model, optimizer)
            saved_order = state["data_order"]
            if state.get("seed") != seed or state.get("rows") != rows or \
                    saved_order["epoch_order"] != epoch_order(rows, seed, saved_order["epoch"]):
                raise ValueError(f"{resume_from} was written for other data or another seed (seed "
                                 f"{state.get('seed')}, {state.get('rows')} rows); "
                                 "set train.resume=false to start over")

        loss_and_grad = nn.value_and_grad(model, masked_loss)
        model.train()
        step = state["step"]
        monitor = TrainingMonitor(adapter_dir, _memory_reader(plan.device), run_config(m, t, plan, seed))
        monitor.begin(step, total_steps)
        tokens_this_process = 0
        while step < total_steps:
            start = time.perf_counter()
            lr = learning_rate_at(step, t, total_steps)
            optimizer.learning_rate = lr
            mx.random.seed(_step_seed(seed, step))  # dropout noise: a function of the step, so resume is exact
            batches = []
            for i in range(accum):
                _, idx = micro_batch_rows(state["micro_batches_consumed"] + i, rows, micro, seed)
                batches.append(collate([encoded[j] for j in idx], pad_id))
            denominator = mx.array(float(max(1, sum(b[3] for b in batches))))
            grads, loss, tokens = None, mx.array(0.0), 0
            for inputs, targets, mask, _, real in batches:
                value, g = loss_and_grad(model, inputs, targets, mask, denominator)
                grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
                loss = loss + value
                tokens += real
                mx.eval(loss, grads)
            grad_norm = _grad_norm(grads)  # lazy: evaluated with the update below
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, grad_norm)
            seconds = time.perf_counter() - start
            tokens_this_process += tokens

            step += 1
            if step % CLEAR_CACHE_EVERY == 0:  # as the seed MLX notes: free the buffer cache every few steps
                mx.clear_cache()
            loss_value = loss.item()
            state["step"] = step
            state["micro_batches_consumed"] += accum
            state["loss_sum"] += loss_value
            state["train_tokens"] += tokens
            state["train_seconds"] += seconds
            window = state["log_window"]  # [loss, tokens, seconds] of the steps since the last log line
            window.append([loss_value, tokens, seconds])
            if step % t.logging_steps == 0 or step == total_steps:
                entry = {"step": step, "epoch": round(state["micro_batches_consumed"] / math.ceil(rows / micro), 4),
                         "loss": sum(w[0] for w in window) / len(window), "learning_rate": lr,
                         "tokens_per_second": sum(w[1] for w in window) / max(sum(w[2] for w in window), 1e-9),
                         "train_tokens": state["train_tokens"]}
                state["log_history"].append(entry)
                monitor.log(step, loss=entry["loss"], learning_rate=lr, grad_norm=grad_norm.item(),
                            epoch=entry["epoch"], tokens_seen=tokens_this_process)
                state["log_window"] = []
            if step % t.save_steps == 0 or step == total_steps:
                cursor = state["micro_batches_consumed"]
                cur_epoch = cursor // math.ceil(rows / micro)
                state.update({
                    "seed": seed, "rows": rows, "total_steps": total_steps,
                    "rng": {"mlx_seed_of_next_step": _step_seed(seed, step),
                            "rule": "mx.random.seed((seed * 1000003 + step) % 2**32) before each optimizer step"},
                    "data_order": {"epoch": cur_epoch, "position_in_epoch": (cursor % math.ceil(rows / micro)) * micro,
                                   "epoch_order": epoch_order(rows, seed, cur_epoch),
                                   "rule": "numpy.random.default_rng([seed, epoch]).permutation(rows)"},
                })
                _save_checkpoint(ckpt_dir, step, model, optimizer, state, t.save_total_limit)
                monitor.checkpoint_saved(step)
        monitor.end()

        model.eval()
        mx.clear_cache()  # between phases: training's buffers are not needed to save, evaluate or fuse

        def save_weights(folder: Path) -> None:
            mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
            (folder / ADAPTER_CONFIG).write_text(json.dumps(
                _adapter_config(m, num_layers, params, plan.dtype, quant), indent=2))

        run = TrainingRun(
            backend=self.name, steps=step, train_loss=state["loss_sum"] / step if step else None,
            train_tokens=int(state["train_tokens"]), train_seconds=state["train_seconds"],
            peak_memory_gb=round(monitor.memory_gb(), 4),
            resumed_from=str(resume_from) if resume_from else None, log_history=state["log_history"])
        return finish_training(run, adapter_dir, m, t, seed, plan, train, tokenizer, save_weights,
                               extra={"adapter_format": BACKENDS["mlx"].adapter_format})

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
        if not base.exists():
            import mlx_lm.utils

            base = mlx_lm.utils._download(cfg["model"], revision=cfg.get("revision"))
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
        print(f"fused {adapter_dir} into {out}", file=sys.stderr, flush=True)
        return str(out)
