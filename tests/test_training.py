"""The transformers+PEFT+TRL backend, evaluation and merge on the tiny model: real training, real files.
Pinned to hf on the CPU, so they run the same on a CUDA box or a Mac."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorapipe.backends import get_backend
from lorapipe.config import EvaluateSection, TrainSection
from lorapipe.hardware.plan import PhasePlan
from lorapipe.phases.train_in_process import train_in_process

# slow: trains (the session's tiny hf adapter, once; tests/conftest.py keeps this module in its worker)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(hf_adapter):
    return hf_adapter


def test_adapter_weights_moved_and_base_weights_did_not(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(trained["info"].path)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero and must have moved"
    base_after = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(trained["base_before"][k], base_after[k]) for k in base_after)
    # the adapter loads in its ecosystem's loader and changes the model's output
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(base(input_ids=ids).logits, tuned(input_ids=ids).logits)
    for name, p in tuned.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base.state_dict()[name.replace("base_model.model.", "").replace(".base_layer", "")])


def test_adapter_folder_describes_itself(trained, tiny_model_dir):
    adapter_dir = Path(trained["info"].path)
    meta = json.loads((adapter_dir / "lorapipe_adapter.json").read_text())
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["data_fingerprint"] == trained["train"].fingerprint
    assert meta["plan"]["backend"] == "hf" and meta["training_config"]["lora"]["r"] == 16
    assert meta["result"]["steps"] == trained["info"].steps > 0
    peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert (adapter_dir / "tokenizer.json").exists() and (adapter_dir / "training_log.jsonl").exists()


def test_checkpoints_are_announced_and_limited(trained):
    import re

    steps = trained["info"].steps
    saved = sorted((trained["work"] / "w" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    announced = [int(n) for n in re.findall(r"checkpoint saved: step (\d+)", trained["log"])]
    # one line per save (every save_steps and at the end), the newest save_total_limit kept on disk
    every = trained["cfg"].save_steps
    assert announced == sorted({*range(every, steps + 1, every), steps})
    assert [p.name for p in saved] == [f"checkpoint-{n}" for n in announced[-trained["cfg"].save_total_limit:]]


def test_rerun_resumes_from_the_last_checkpoint(trained, capsys):
    info = trained["info"]
    again = train_in_process(trained["model"], trained["cfg"], 7, trained["plan"], trained["train"],
                                    trained["eval"], trained["work"] / "w", trained["work"] / "w" / "adapter2")
    out = capsys.readouterr().out
    assert "resuming from" in out and again.resumed_from is not None
    assert again.steps == info.steps


def test_evaluation_scores_base_and_tuned(trained, tiny_model_dir):
    from lorapipe.phases.evaluate import evaluate_adapter

    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=4, max_seq_length=128, reason="test")
    m = evaluate_adapter(trained["info"].path, trained["test"], phase,
                         EvaluateSection(max_samples=16, generation_samples=2, max_new_tokens=8))
    assert m.scored_rows == min(16, len(trained["test"])) and m.scored_tokens > 0
    assert m.tuned.perplexity < m.base.perplexity and m.tuned_beats_base
    assert m.generated_rows == 2 and 0.0 <= m.tuned.rouge_l <= 1.0 and m.tuned.stop_rate is not None
    assert m.memory_gib > 0  # the phase's memory is recorded with its metrics


def test_the_base_scored_apart_equals_the_base_scored_beside_the_adapter(trained):
    """The base step's scores (the untuned base loaded alone) stand in for the base in every evaluation of an adapter
    on that base: they must be what scoring it with the adapter switched off gives, row by row and token by token."""
    from lorapipe.phases.evaluate import evaluate_adapter, score_base

    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=4, max_seq_length=128, reason="test")
    settings = EvaluateSection(max_samples=16, generation_samples=3, max_new_tokens=8)
    together = evaluate_adapter(trained["info"].path, trained["test"], phase, settings, seed=3)
    base = score_base(trained["model"], "sft", trained["test"], phase.base_alone(), settings, seed=3)
    apart = evaluate_adapter(trained["info"].path, trained["test"], phase, settings, seed=3, base=base)
    assert base.scored_tokens == together.scored_tokens > 0
    assert base.row_losses == pytest.approx(together.row_losses["base"], abs=1e-6)
    assert base.scores.loss == pytest.approx(together.base.loss, abs=1e-6)
    assert [g["prediction"] for g in base.generations] == [s["base"] for s in together.samples]
    # the tuned side is scored as before, and the comparison is the same
    assert apart.tuned.loss == pytest.approx(together.tuned.loss, abs=1e-6)
    assert apart.base == base.scores and apart.samples == [
        {**s, "base": g["prediction"], "base_stopped": g["stopped"], "base_new_tokens": g["new_tokens"]}
        for s, g in zip(together.samples, base.generations)]
    assert apart.perplexity_gain == pytest.approx(together.perplexity_gain, abs=1e-6)


def test_the_base_plan_leaves_the_adapter_out_so_every_rank_shares_it(tiny_model_dir):
    """The base step's cache key holds its plan's content: adapters of other ranks (another LoRA weights term in the
    evaluation plan) must give the same base plan."""
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe

    facts, hw = model_size(str(tiny_model_dir)), probe(".")
    plans = [decide_plan(TrainSection(backend="hf", device="cpu", lora={"r": r}, learning_rate=lr), hw, facts).evaluate
             for r, lr in ((4, 1e-3), (32, 5e-3))]
    assert plans[0].memory_terms != plans[1].memory_terms  # the adapter is in the evaluation plan...
    assert plans[0].base_alone() == plans[1].base_alone()  # ...and not in the base's
    assert not any("LoRA" in t.name for t in plans[0].base_alone().memory_terms)
    assert plans[0].base_alone().predicted_peak_gib < plans[0].predicted_peak_gib
    # on an 8B model on a 24 GB card the evaluation plan's reason and warnings quote the peak with the adapter: the
    # base's plan must not carry them
    from tests.model_facts import facts as public_facts
    from tests.test_plan import make_probe

    big = [decide_plan(TrainSection(backend="hf", quantization="nf4", gradient_checkpointing=True, lora={"r": r}),
                       make_probe(cuda_gib=24), public_facts("llama-3.1-8b")).evaluate for r in (8, 64)]
    assert big[0].reason != big[1].reason or big[0].memory_terms != big[1].memory_terms
    assert big[0].base_alone() == big[1].base_alone()


def test_merge_matches_base_plus_adapter_and_is_idempotent(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorapipe.phases.merge import merge_adapter

    def on_cpu(dtype):
        return PhasePlan(phase="merge", device="cpu", dtype=dtype, batch_size=1, max_seq_length=256, reason="test")

    out = tmp_path / "merged"
    check = merge_adapter(trained["info"].path, str(out), trained["test"], on_cpu("float32"))
    assert check.passed and check.max_abs_logit_diff <= 1e-4 and check.rows_checked > 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    again = merge_adapter(trained["info"].path, str(out), trained["test"], on_cpu("float32"))
    assert "already merged" in capsys.readouterr().out and again == check
    bf16 = merge_adapter(trained["info"].path, str(tmp_path / "bf16"), trained["test"], on_cpu("bfloat16"))
    assert bf16.passed and bf16.tolerance == 0.1 and bf16.max_abs_logit_diff > check.max_abs_logit_diff


def test_the_selection_points_name_unknown_backends_and_tasks():
    from lorapipe.tasks import get_task

    with pytest.raises(ValueError, match="auto, hf, unsloth, mlx"):
        get_backend("jax")
    with pytest.raises(ValueError, match="not one of sft, classification"):
        get_task("ranking")
    # what each name selects: the catalog's entry, implemented
    assert get_backend("hf").name == "hf" and get_task("classification").spec.model_kind == "sequence_classifier"


def test_checkpoints_of_other_code_are_set_aside_and_resumed_only_on_purpose(trained, tmp_path, capsys):
    from lorapipe.training.checkpoints import work_dir_for

    checkpoint = sorted((trained["work"] / "w" / "checkpoints").glob("checkpoint-*"),
                        key=lambda p: int(p.name.split("-")[-1]))[-1]
    older = tmp_path / "runs" / "inputs0123-oldcode0000" / "checkpoints"
    shutil.copytree(checkpoint, older / checkpoint.name)
    work_dir = work_dir_for(tmp_path / "runs", "inputs0123", "newcode1111")
    out = capsys.readouterr().out
    assert work_dir.name == "inputs0123-newcode1111"
    assert f"set aside: {older.parent}" in out and f"--set train.resume_from={older / checkpoint.name}" in out
    # the same inputs and code find their own checkpoints again: nothing is set aside
    shutil.copytree(checkpoint, work_dir / "checkpoints" / "checkpoint-1")
    assert work_dir_for(tmp_path / "runs", "inputs0123", "newcode1111") == work_dir
    assert "set aside" not in capsys.readouterr().out
    # a save cut short (no trainer_state.json, or a hidden .partial folder) is not a checkpoint to offer
    (tmp_path / "runs" / "inputs4567-oldcode0000" / "checkpoints" / ".step-3.partial").mkdir(parents=True)
    (tmp_path / "runs" / "inputs4567-oldcode0000" / "checkpoints" / "checkpoint-3").mkdir()
    work_dir_for(tmp_path / "runs", "inputs4567", "newcode1111")
    assert "set aside" not in capsys.readouterr().out

    on_purpose = trained["cfg"].model_copy(update={"resume_from": str(older / checkpoint.name)})
    info = train_in_process(trained["model"], on_purpose, 7, trained["plan"], trained["train"],
                                   trained["eval"], tmp_path / "fresh", tmp_path / "fresh" / "adapter")
    out = capsys.readouterr().out
    assert f"resuming from {older / checkpoint.name} (train.resume_from)" in out
    assert info.resumed_from == str(older / checkpoint.name) and info.steps == trained["info"].steps


def test_a_run_resumed_on_purpose_continues_its_own_progress_after_another_crash(trained, tmp_path, capsys):
    from lorapipe.backends.trainer import resume_point
    from lorapipe.training.checkpoints import resume_checkpoint

    done = sorted((trained["work"] / "w" / "checkpoints").glob("checkpoint-*"),
                  key=lambda p: int(p.name.split("-")[-1]))[-1]
    old = tmp_path / "old" / "checkpoint-40"
    shutil.copytree(done, old)
    own = tmp_path / "work" / "checkpoints"
    cfg = TrainSection(resume_from=str(old))
    assert resume_point(cfg, own) == old  # nothing of its own yet
    (own / "checkpoint-70").mkdir(parents=True)  # a save cut short before it wrote anything: not resumed
    shutil.copytree(done, own / "checkpoint-60")
    assert resume_point(cfg, own) == own / "checkpoint-60"  # its own newer complete checkpoint wins
    out = capsys.readouterr().out
    assert "checkpoint-70 is incomplete (adapter_model.safetensors is missing): resuming from checkpoint-60" in out
    assert f"resuming from {own / 'checkpoint-60'}" in out
    assert resume_checkpoint(None, TrainSection()) is None
    # train.resume=false looks at nothing (and sets nothing aside)
    (own / "checkpoint-80").mkdir()
    assert resume_point(TrainSection(resume=False), own) is None and (own / "checkpoint-80").is_dir()
