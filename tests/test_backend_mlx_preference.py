"""task: preference on the mlx backend: DPO and ORPO with mlx-lm-lora's losses in lorapipe's own mlx loop, on the tiny
seeded Llama: DPO starts at ln 2 (the policy is the reference), learns a learnable preference (held-out margins grow,
scored by the evaluation's own torch scorer on the fused model), ORPO trains, a run killed between checkpoints resumes
to the uninterrupted adapter against the starting model's reference, and the adapter describes its preference run.

Runs on mlx's CPU backend (mlx[cpu] on Linux) as well as on Apple Silicon.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm_lora", reason="preference tuning on mlx needs mlx-lm-lora: pip install -e '.[mlx]'")

import mlx.core as mx
import numpy as np

import lorapipe.backends.mlx as mlx_backend
import lorapipe.backends.mlx_training as mlx_training
from lorapipe.backends.mlx import MLXBackend
from lorapipe.backends.mlx_preference import REFERENCE_SCORES, encode_pairs, reference_scores
from lorapipe.config import LoraSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import MemoryEstimate, PhasePlan, TrainingPlan
from lorapipe.tasks.preference import Preference
from lorapipe.training.adapter import ADAPTER_METADATA
from tests.test_backend_mlx import adapter_weights, sha256
from tests.test_preference_train import learnable_pairs

pytestmark = [pytest.mark.mlx, pytest.mark.slow]

STEPS, SAVE_STEPS = 8, 3  # 16 pairs, 4 a step: two epochs; checkpoints at 3, 6 and 8
TRAIN_PAIRS, HELD_OUT = slice(0, 16), slice(80, 96)
MAX_LEN = 64  # every side of these pairs fits: nothing is cut
SEED = 0


class SimulatedCrash(Exception):
    pass


def train_cfg(method: str = "dpo", **over) -> TrainSection:
    # warmup, a linear schedule, dropout and gradient accumulation: every piece of state resume must restore
    kw = dict(backend="mlx", method=method, max_steps=STEPS, save_steps=SAVE_STEPS, save_total_limit=3,
              learning_rate=1e-2, warmup_steps=1, lr_scheduler="linear", logging_steps=1, weight_decay=0.01,
              lora=LoraSection(r=4, alpha=8, dropout=0.1))
    kw.update(over)
    return TrainSection(**kw)


def plan(method: str = "dpo") -> TrainingPlan:
    return TrainingPlan(
        task="preference", method=method, backend="mlx", device="cpu", dtype="float32", quantization="none",
        micro_batch_size=2, gradient_accumulation_steps=2, effective_batch_size=4, max_seq_length=MAX_LEN,
        gradient_checkpointing=False, optimizer="adamw_torch", reasons=[], warnings=[],
        memory=MemoryEstimate(weights_gib=0.001, lora_and_optimizer_gib=0.001, activations_gib=0.01, total_gib=0.012,
                              budget_gib=1.0),
    )


def training_log(adapter_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter_dir / "training_log.jsonl").read_text().splitlines()]


def without_timing(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "tokens_per_second"} for e in log]


def train(model_dir: Path, root: Path, method: str = "dpo", adapter: str = "adapter", **over):
    return MLXBackend().train(Preference(), ModelSection(name_or_path=str(model_dir)), train_cfg(method, **over), SEED,
                              plan(method), ConversationDataset(learnable_pairs()[TRAIN_PAIRS], name="train"),
                              ConversationDataset([]), root / "work", root / adapter)


@pytest.fixture(scope="module")
def dpo(tiny_model_dir, tmp_path_factory):
    """One uninterrupted DPO run."""
    root = tmp_path_factory.mktemp("mlx-dpo")
    base_hash = sha256(tiny_model_dir / "model.safetensors")
    info = train(tiny_model_dir, root)
    return {"info": info, "adapter": root / "adapter", "work": root / "work", "base_hash": base_hash}


def test_dpo_starts_at_ln2_leaves_the_base_alone_and_learns_the_preference(dpo, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from lorapipe.models.loading import load_tokenizer
    from lorapipe.tasks.preference import answer_logps

    info, adapter = dpo["info"], dpo["adapter"]
    assert info.backend == "mlx" and info.steps == STEPS and info.train_rows == 16 and info.resumed_from is None
    log = training_log(adapter)
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    # step 1 is scored before any update: the freshly LoRA'd policy (B = 0) is the reference
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["rewards/margins"] > 0 and log[-1]["rewards/accuracies"] == 1
    # the base folder is untouched and the trained model's base weights are the saved ones; every lora_b moved
    assert sha256(tiny_model_dir / "model.safetensors") == dpo["base_hash"]
    model, _ = MLXBackend().load_adapter(adapter)
    saved = mx.load(str(tiny_model_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(np.array(model.model.layers[0].self_attn.q_proj.linear.weight), np.array(saved))
    weights = adapter_weights(adapter)
    assert weights and all(np.abs(v).max() > 0 for k, v in weights.items() if k.endswith("lora_b"))

    # held-out pairs, scored by the evaluation's torch scorer on the fused model: the chosen-minus-rejected margin grew
    fused = MLXBackend().fuse(str(adapter), str(tmp_path / "fused"))
    tokenizer = load_tokenizer(str(adapter))
    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=8, max_seq_length=MAX_LEN,
                      reason="test")
    held_out = learnable_pairs()[HELD_OUT]
    sides = [p.side(s) for p in held_out for s in ("chosen", "rejected")]
    margins = {}
    for label, folder in (("base", tiny_model_dir), ("tuned", Path(fused))):
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        logps = [lp for lp, _ in answer_logps(hf, tokenizer, sides, phase)]
        margins[label] = np.array(logps[0::2]) - np.array(logps[1::2])
    assert margins["tuned"].mean() > margins["base"].mean() + 1.0, margins
    assert (margins["tuned"] > margins["base"]).all(), margins


def test_orpo_trains_without_a_reference(tiny_model_dir, tmp_path):
    info = train(tiny_model_dir, tmp_path, "orpo")
    log = training_log(tmp_path / "adapter")
    assert info.steps == STEPS and all(math.isfinite(e["loss"]) for e in log)
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["rewards/margins"] > log[0]["rewards/margins"]
    assert all(np.abs(v).max() > 0 for k, v in adapter_weights(tmp_path / "adapter").items() if k.endswith("lora_b"))
    assert not (tmp_path / "work" / REFERENCE_SCORES).exists()
    meta = json.loads((tmp_path / "adapter" / ADAPTER_METADATA).read_text())
    assert meta["preference"] == {"method": "orpo", "beta": 0.1, "loss_type": None, "label_smoothing": None,
                                  "precompute_reference": None, "desirable_weight": None, "undesirable_weight": None,
                                  "reference": None}


def test_a_dpo_run_killed_between_checkpoints_resumes_to_the_same_adapter_against_the_starting_model(
        dpo, tiny_model_dir, tmp_path, monkeypatch):
    """Killed before step 5 (checkpoint at 3), then re-run: the uninterrupted adapter, bit for bit, and the reference
    the resumed run trains against is the starting model's, not the checkpoint's."""
    import mlx_lm

    real_lr = mlx_backend.learning_rate_at

    def crash_before_step_5(step, *args):
        if step == 4:
            raise SimulatedCrash
        return real_lr(step, *args)

    monkeypatch.setattr(mlx_backend, "learning_rate_at", crash_before_step_5)
    with pytest.raises(SimulatedCrash):
        train(tiny_model_dir, tmp_path)
    monkeypatch.setattr(mlx_backend, "learning_rate_at", real_lr)
    assert [p.name for p in mlx_training.list_checkpoints(tmp_path / "work" / "checkpoints")] == ["step-3"]
    (tmp_path / "work" / REFERENCE_SCORES).unlink()  # what the resumed run writes is its own

    info = train(tiny_model_dir, tmp_path)
    assert info.resumed_from.endswith("step-3")
    assert sha256(tmp_path / "adapter" / "adapters.safetensors") == sha256(dpo["adapter"] / "adapters.safetensors")
    assert without_timing(training_log(tmp_path / "adapter")) == without_timing(training_log(dpo["adapter"]))

    # the resumed run's reference: the uninterrupted run's, and the bare base's scores (no LoRA at all)
    resumed = json.loads((tmp_path / "work" / REFERENCE_SCORES).read_text())
    assert resumed == json.loads((dpo["work"] / REFERENCE_SCORES).read_text())
    assert resumed["reference"] == "starting_model" and len(resumed["chosen"]) == 16
    base, _ = mlx_lm.load(str(tiny_model_dir))
    pairs = encode_pairs(Preference().tokenizer(ModelSection(name_or_path=str(tiny_model_dir))),
                         learnable_pairs()[TRAIN_PAIRS], MAX_LEN, "dpo")
    chosen, rejected = reference_scores(base, pairs, 2, 0, "sigmoid")
    np.testing.assert_allclose(resumed["chosen"], chosen, atol=1e-5, rtol=0)
    np.testing.assert_allclose(resumed["rejected"], rejected, atol=1e-5, rtol=0)
    # ... which the trained policy no longer matches: a reference taken from a checkpoint would not be the base's
    tuned, _ = MLXBackend().load_adapter(tmp_path / "adapter")
    tuned_chosen, tuned_rejected = reference_scores(tuned, pairs, 2, 0, "sigmoid")
    assert np.abs(tuned_chosen - chosen).max() > 0.1 and (tuned_chosen - tuned_rejected > chosen - rejected).all()

    # train.resume=false starts over: the same seed reaches the same adapter again
    info = train(tiny_model_dir, tmp_path, adapter="again", resume=False)
    assert info.resumed_from is None
    assert sha256(tmp_path / "again" / "adapters.safetensors") == sha256(dpo["adapter"] / "adapters.safetensors")


def test_the_adapter_records_its_preference_run(dpo, capsys):
    meta = json.loads((dpo["adapter"] / ADAPTER_METADATA).read_text())
    assert meta["task"] == "preference" and meta["adapter_format"] == "mlx-lm" and meta["result"]["backend"] == "mlx"
    assert meta["preference"] == {"method": "dpo", "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                  "precompute_reference": True, "desirable_weight": None, "undesirable_weight": None,
                                  "reference": "starting_model"}
    # the monitor's rows carry TRL's reward columns, as the hf backend's do
    rows = [json.loads(x) for x in (dpo["adapter"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all({"rewards/margins", "rewards/accuracies", "loss", "grad_norm"} <= set(r) for r in rows)
    assert rows[-1]["rewards/margins"] == pytest.approx(training_log(dpo["adapter"])[-1]["rewards/margins"])


@pytest.mark.parametrize(("loss_type", "start"), [("ipo", (0 - 1 / (2 * 0.1)) ** 2), ("hinge", 1.0)])
def test_ipo_and_hinge_start_where_policy_equals_reference(loss_type, start, tiny_model_dir, tmp_path):
    """Step 1's loss at a zero log-ratio: IPO's (0 - 1 / 2 beta)^2, which needs the reference scored as the policy is
    (mean per token for ipo), and hinge's relu(1 - 0)."""
    train(tiny_model_dir, tmp_path, max_steps=1, preference={"loss_type": loss_type})
    first = training_log(tmp_path / "adapter")[0]
    assert first["loss"] == pytest.approx(start, abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    reference = json.loads((tmp_path / "work" / REFERENCE_SCORES).read_text())
    # ipo's reference is a mean per answer token (a random model's: about -ln 1024 = -6.9), hinge's a sum over them
    per_token = loss_type == "ipo"
    assert reference["loss_type"] == loss_type
    assert all((-10 < v < -5) if per_token else v < -50 for v in reference["chosen"]), reference["chosen"]


@pytest.mark.parametrize(("method", "over", "expected"), [
    ("kto", {}, r"train\.method=kto is not available on the mlx backend"),
    ("dpo", {"preference": {"loss_type": "robust"}}, r"train\.preference\.loss_type=robust .* sigmoid, ipo, hinge"),
    ("dpo", {"preference": {"label_smoothing": 0.1}}, r"train\.preference\.label_smoothing=0\.1 .* set it to 0"),
])
def test_what_mlx_cannot_train_is_refused_by_key(method, over, expected, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=expected):
        train(tiny_model_dir, tmp_path, method, **over)


def test_unpaired_rows_are_refused_with_the_fix(tiny_model_dir, tmp_path):
    rows = learnable_pairs()[:4]
    rows[1].rejected, rows[1].desirable = None, True
    with pytest.raises(ValueError, match=r"unpaired feedback .*: pairs\.jsonl:2\. Give pairs, or set train\.method: "
                                         "kto"):
        MLXBackend().train(Preference(), ModelSection(name_or_path=str(tiny_model_dir)), train_cfg(), SEED, plan(),
                           ConversationDataset(rows), ConversationDataset([]), tmp_path / "work", tmp_path / "adapter")


def test_the_evaluate_step_scores_an_mlx_preference_adapter_against_its_starting_model(dpo):
    """The pipeline's evaluation of a preference run reads the mlx-lm adapter folder as it reads a PEFT one: the base
    and the fused tuned model, scored on held-out pairs with the reward margin against the start."""
    from lorapipe.config import EvaluateSection

    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=8, max_seq_length=MAX_LEN,
                      reason="test")
    m = Preference().evaluate(str(dpo["adapter"]), ConversationDataset(learnable_pairs()[HELD_OUT], name="test"),
                              phase, EvaluateSection(max_samples=16, generation_samples=2, max_new_tokens=4))
    assert m.tuned.preference_accuracy > m.base.preference_accuracy
    assert m.tuned.reward_margin > 0 and m.tuned_beats_base and len(m.samples) == 2
