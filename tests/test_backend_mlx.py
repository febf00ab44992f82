"""The mlx-lm backend on the tiny seeded Llama: training, checkpoints, exact resume, QLoRA, mlx-lm loading, fuse.

Runs on mlx's CPU backend (mlx[cpu] on Linux) as well as on Apple Silicon.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm: pip install -e '.[mlx]' (Linux: mlx[cpu])")

import mlx.core as mx
import numpy as np

import lorapipe.backends.mlx as mlx_backend
import lorapipe.backends.mlx_training as mlx_training
from lorapipe.backends.base import BackendUnavailable
from lorapipe.backends.mlx import MLXBackend
from lorapipe.config import LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.formats import read_records
from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan
from lorapipe.tasks.sft import SFT
from lorapipe.training.adapter import ADAPTER_METADATA
from tests.monitor_checks import assert_monitor_outputs

pytestmark = [pytest.mark.mlx, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
STEPS, SAVE_STEPS, KEEP = 7, 3, 2  # saves at 3, 6 and the last step 7; keeps the newest 2
SEED = 0
PROMPT = [[2, 45, 300, 17, 99, 3, 2, 120, 7]]  # any ids of the 1024-token tiny vocabulary


class SimulatedCrash(Exception):
    pass


def train_cfg(**over) -> TrainSection:
    # linear schedule with warmup, dropout and gradient accumulation: every piece of state resume must restore
    kw = dict(backend="mlx", max_steps=STEPS, save_steps=SAVE_STEPS, save_total_limit=KEEP, learning_rate=1e-2,
              warmup_steps=1, lr_scheduler="linear", logging_steps=2, weight_decay=0.01,
              lora=LoraSection(r=4, alpha=8, dropout=0.1))
    kw.update(over)
    return TrainSection(**kw)


def plan(quantization: str = "none") -> TrainingPlan:
    return TrainingPlan(
        backend="mlx", device="cpu", dtype="float32", quantization=quantization, micro_batch_size=2,
        gradient_accumulation_steps=2, effective_batch_size=4, max_seq_length=128, gradient_checkpointing=False,
        optimizer="adamw_torch", reasons=[], warnings=[],
        memory=MemoryEstimate(weights_gib=0.001, lora_and_optimizer_gib=0.001, activations_gib=0.01, total_gib=0.012,
                              budget_gib=1.0),
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_weights(adapter_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(adapter_dir / "adapters.safetensors")).items()}


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(PROMPT)).astype(mx.float32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lorapipe.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), [DATA])


@pytest.fixture(scope="module")
def dataset() -> ConversationDataset:
    return ConversationDataset(read_records([str(DATA)]).records[:64], name="train")


@pytest.fixture(scope="module")
def baseline(tiny, dataset, tmp_path_factory):
    """One uninterrupted LoRA run; its printed output is kept for the checkpoint assertions."""
    root = tmp_path_factory.mktemp("baseline")
    base_hash = sha256(tiny / "model.safetensors")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        info = MLXBackend().train(SFT(), ModelSection(name_or_path=str(tiny)), train_cfg(), SEED, plan(), dataset,
                                  dataset,
                                  root / "work", root / "adapter")
    return {"info": info, "adapter": root / "adapter", "work": root / "work", "stdout": out.getvalue(),
            "base_hash": base_hash}


@pytest.fixture(scope="module")
def qlora(tiny, dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    info = MLXBackend().train(SFT(), ModelSection(name_or_path=str(tiny)), train_cfg(max_steps=4), SEED, plan("nf4"),
                              dataset, dataset, root / "work", root / "adapter")
    return {"info": info, "adapter": root / "adapter"}


def test_training_leaves_the_base_alone_and_moves_the_adapter(tiny, baseline):
    info = baseline["info"]
    assert info.backend == "mlx" and info.device == "cpu" and info.steps == STEPS and info.resumed_from is None
    assert info.train_rows == 64 and info.train_tokens > 0 and info.tokens_per_second > 0
    assert info.train_loss is not None and np.isfinite(info.train_loss)
    assert info.peak_memory_gib > 0 and info.versions["mlx_lm"]
    # the base folder is untouched, and a base tensor loaded from it equals the one in the trained model's base
    assert sha256(tiny / "model.safetensors") == baseline["base_hash"]
    model, _ = MLXBackend().load_adapter(baseline["adapter"])
    saved = mx.load(str(tiny / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(np.array(model.model.layers[0].self_attn.q_proj.linear.weight), np.array(saved))
    # only LoRA matrices are saved; lora_b starts at zero in mlx-lm and must have moved in every layer
    weights = adapter_weights(baseline["adapter"])
    assert weights and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in weights)
    assert len(weights) == 2 * 7 * 2  # (A, B) x 7 projections x 2 layers
    assert all(np.abs(v).max() > 0 for k, v in weights.items() if k.endswith("lora_b"))


def test_adapter_folder_is_mlx_lm_format_plus_lorapipe_metadata(baseline):
    adapter = baseline["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.1, "keys": [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
        "self_attn.q_proj", "self_attn.v_proj"]}
    meta = json.loads((adapter / ADAPTER_METADATA).read_text())
    assert {"base_model", "data_fingerprint", "seed", "plan", "training_config", "result"} <= set(meta)
    assert meta["adapter_format"] == "mlx-lm" and meta["result"]["backend"] == "mlx" and meta["seed"] == SEED
    assert (adapter / "tokenizer_config.json").exists() and (adapter / "tokenizer.json").exists()
    log = [json.loads(line) for line in (adapter / "training_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6, 7]
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= set(e) for e in log)
    assert log[-1]["loss"] < log[0]["loss"]


def test_checkpoints_are_announced_and_pruned(baseline):
    out = baseline["stdout"]
    assert [line for line in out.splitlines() if line.startswith("checkpoint saved")] == [
        "checkpoint saved: step 3", "checkpoint saved: step 6", "checkpoint saved: step 7"]
    ckpts = mlx_training.list_checkpoints(baseline["work"] / "checkpoints")
    assert [p.name for p in ckpts] == ["step-6", "step-7"]  # save_total_limit=2
    last = ckpts[-1]
    assert {p.name for p in last.iterdir()} == {"adapters.safetensors", "optimizer.safetensors", "trainer_state.json"}
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["micro_batches_consumed"] == STEPS * 2
    assert {"epoch", "position_in_epoch", "epoch_order"} <= set(state["data_order"]) and "rng" in state
    opt = mx.load(str(last / "optimizer.safetensors"))
    assert int(opt["step"].item()) == STEPS and any(k.endswith("lora_b.m") for k in opt)


def test_mlx_lm_loads_the_adapter_and_it_changes_the_model(tiny, baseline):
    import mlx_lm

    base, _ = mlx_lm.load(str(tiny))
    tuned, tokenizer = mlx_lm.load(str(tiny), adapter_path=str(baseline["adapter"]))
    base_logits, tuned_logits = mlx_logits(base), mlx_logits(tuned)
    assert np.abs(tuned_logits - base_logits).max() > 1e-3
    # mlx-lm's own loader and the backend's loader build the same model
    ours, _ = MLXBackend().load_adapter(baseline["adapter"])
    np.testing.assert_array_equal(mlx_logits(ours), tuned_logits)
    # mlx-lm generates with the adapter on: its first (greedy) token is the argmax of the tuned model's logits
    first = next(mlx_lm.stream_generate(tuned, tokenizer, PROMPT[0], max_tokens=1)).token
    assert first == int(np.argmax(tuned_logits[0, -1]))


def test_interrupted_run_resumes_to_the_same_adapter(tiny, dataset, baseline, tmp_path, monkeypatch, capsys):
    """Killed after step 4 (between the checkpoints at 3 and 6), then re-run: same adapter, bit for bit.

    Same schedule horizon (max_steps) in both runs; the interruption is raised from inside the loop.
    Exact equality holds because everything resume needs is restored exactly: LoRA weights and the Adam
    moments/step round-trip through float32 safetensors, and the data order and dropout RNG are functions
    of (seed, step).
    """
    real_lr = mlx_backend.learning_rate_at

    def crash_before_step_5(step, *args):
        if step == 4:
            raise SimulatedCrash
        return real_lr(step, *args)

    model = ModelSection(name_or_path=str(tiny))
    monkeypatch.setattr(mlx_backend, "learning_rate_at", crash_before_step_5)
    with pytest.raises(SimulatedCrash):
        MLXBackend().train(SFT(), model, train_cfg(), SEED, plan(), dataset, dataset, tmp_path / "work",
                           tmp_path / "adapter")
    monkeypatch.setattr(mlx_backend, "learning_rate_at", real_lr)
    assert [p.name for p in mlx_training.list_checkpoints(tmp_path / "work" / "checkpoints")] == ["step-3"]
    assert "checkpoint saved: step 3" in capsys.readouterr().out

    info = MLXBackend().train(SFT(), model, train_cfg(), SEED, plan(), dataset, dataset, tmp_path / "work",
                              tmp_path / "adapter")
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'work' / 'checkpoints' / 'step-3'}" in out
    assert "checkpoint saved: step 6" in out and "checkpoint saved: step 7" in out
    assert info.steps == STEPS and info.resumed_from.endswith("step-3")
    resumed, uninterrupted = adapter_weights(tmp_path / "adapter"), adapter_weights(baseline["adapter"])
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    logs = [[json.loads(x)["loss"] for x in (d / "training_log.jsonl").read_text().splitlines()]
            for d in (tmp_path / "adapter", baseline["adapter"])]
    assert logs[0] == logs[1]

    # resume=False starts over (and, seeded, reaches the same adapter again)
    info = MLXBackend().train(SFT(), model, train_cfg(resume=False), SEED, plan(), dataset, dataset, tmp_path / "work",
                              tmp_path / "again")
    assert info.resumed_from is None and "resuming from" not in capsys.readouterr().out
    for key, value in adapter_weights(tmp_path / "again").items():
        np.testing.assert_array_equal(value, uninterrupted[key], err_msg=key)


def test_qlora_trains_on_a_4bit_base_and_loads(tiny, qlora):
    import mlx.nn as nn
    import mlx_lm

    info, adapter = qlora["info"], qlora["adapter"]
    assert info.steps == 4 and np.isfinite(info.train_loss)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_quantization"]["bits"] == 4 and cfg["fine_tune_type"] == "lora"
    assert all(np.abs(v).max() > 0 for k, v in adapter_weights(adapter).items() if k.endswith("lora_b"))
    model, _ = MLXBackend().load_adapter(adapter)
    assert isinstance(model.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    tuned, _ = mlx_lm.load(str(tiny), adapter_path=str(adapter))  # mlx-lm's loader reads it too
    assert np.isfinite(mlx_logits(tuned)).all()


# float32 on mlx's CPU backend vs torch CPU: the fused and unfused paths differ only by summation order.
# Observed max |diff| ~2.4e-7 for both LoRA and QLoRA (the adapter itself moves logits by ~0.7).
FUSE_ATOL = 1e-5


@pytest.mark.parametrize("which", ["baseline", "qlora"])
def test_fused_model_loads_in_transformers_and_matches_mlx(which, request, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    adapter = request.getfixturevalue(which)["adapter"]
    out = MLXBackend().fuse(str(adapter), str(tmp_path / "fused"))
    assert (Path(out) / "config.json").exists() and (Path(out) / "tokenizer_config.json").exists()
    config = json.loads((Path(out) / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(PROMPT)).logits.numpy()
    model, _ = MLXBackend().load_adapter(adapter)  # the quantised base + adapter for QLoRA
    np.testing.assert_allclose(hf_logits, mlx_logits(model), atol=FUSE_ATOL, rtol=0)


def test_learning_rate_schedules_follow_transformers():
    t = train_cfg(warmup_steps=2, learning_rate=1.0)
    assert [mlx_backend.learning_rate_at(s, t, 6) for s in range(6)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    cos = train_cfg(warmup_steps=0, learning_rate=1.0, lr_scheduler="cosine")
    assert mlx_backend.learning_rate_at(0, cos, 4) == 1.0 and abs(mlx_backend.learning_rate_at(2, cos, 4) - 0.5) < 1e-12
    const = train_cfg(warmup_steps=2, learning_rate=1.0, lr_scheduler="constant_with_warmup")
    assert [mlx_backend.learning_rate_at(s, const, 6) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_missing_mlx_lm_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm now raises ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install -e '\.\[mlx\]'"):
        MLXBackend().train(SFT(), ModelSection(name_or_path="unused"), train_cfg(), SEED, plan(),
                           ConversationDataset([]), ConversationDataset([]), Path("unused"), Path("unused"))


def test_mlx_reports_through_the_same_monitor_as_the_torch_backends(baseline):
    """metrics.jsonl/.csv with the common columns, the three plots and the common progress line."""
    rows = assert_monitor_outputs(baseline["adapter"], [2, 4, 6, 7], STEPS, baseline["stdout"])
    log = [json.loads(line) for line in (baseline["adapter"] / "training_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([e["loss"] for e in log])


def test_mlx_metrics_reach_the_experiment_tracker(tiny, dataset, tmp_path, monkeypatch):
    """The same rows go to the W&B run a ZenML wandb tracker opens for the step (W&B's own offline mode)."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[tracking]')")
    from tests.wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # offline needs no key; without one wandb may prompt for it
    run = wandb.init(project="lorapipe-test", mode="offline")
    try:
        MLXBackend().train(SFT(), ModelSection(name_or_path=str(tiny)), train_cfg(max_steps=4), SEED, plan(), dataset,
                           dataset, tmp_path / "work", tmp_path / "adapter")
        run_dir = Path(run.dir).parent
    finally:
        wandb.finish()
        wandb.teardown()  # wandb keeps process-wide settings (the run folder): later runs must not inherit them
    history, _, config = read_offline_run(run_dir)
    rows = [json.loads(x) for x in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    logged = [h for h in history if "train/loss" in h]
    assert [h["train/loss"] for h in logged] == pytest.approx([r["loss"] for r in rows])
    assert [h["train/tokens_per_second"] for h in logged] == pytest.approx([r["tokens_per_second"] for r in rows])
    assert config["plan"]["backend"] == "mlx" and config["train"]["max_steps"] == 4
