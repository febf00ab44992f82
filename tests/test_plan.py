"""The one decision point. Every probe is built by hand here (CUDA, Apple, and a CPU box alike), so these tests
assert the same on any machine: the probe object (plain data) is what we fake, never the decision code."""

import pytest

from lorapipe.config import TrainSection
from lorapipe.hardware import plan as plan_module
from lorapipe.hardware.plan import PlanError
from lorapipe.hardware.probe import CudaDevice, HardwareProbe
from tests.model_facts import facts, tiny_facts

ALL = {"torch": "2.13.0", "transformers": "5.17.0", "peft": "0.21", "trl": "1.14", "bitsandbytes": "0.50.2",
       "unsloth": "2026.10.9", "mlx": "0.32", "mlx_lm": "0.32.2"}
SMALL = facts("llama-3.1-8b")


def decide_plan(train, probe, size, evaluate=None, merge=None):
    """The train phase of the run plan (most tests here are about it)."""
    return plan_module.decide_plan(train, probe, size, evaluate, merge).train


def make_probe(cuda_gib=None, apple=False, packages=None, ram_gib=64.0, disk_gib=500.0, gpus=1):
    """A machine with `gpus` alike CUDA GPUs of `cuda_gib` each (none without cuda_gib), or a Mac, or a CPU box."""
    devices = [CudaDevice(index=i, name="NVIDIA RTX 4090", total_memory_gib=cuda_gib, capability="8.9", bf16=True)
               for i in range(gpus)] if cuda_gib else []
    return HardwareProbe(os="Darwin" if apple else "Linux", machine="arm64" if apple else "x86_64", python="3.11",
                         cpu_count=16, ram_total_gib=ram_gib, ram_available_gib=ram_gib, disk_free_gib=disk_gib,
                         disk_path="/data", cuda_available=bool(cuda_gib), cuda_devices=devices, apple_silicon=apple,
                         mps_available=apple, packages=ALL if packages is None else packages)


def test_auto_picks_unsloth_on_cuda_with_unsloth():
    plan = decide_plan(TrainSection(quantization="nf4"), make_probe(cuda_gib=24), SMALL)
    assert (plan.backend, plan.device, plan.dtype, plan.quantization) == ("unsloth", "cuda", "bfloat16", "nf4")


def test_auto_picks_hf_with_bitsandbytes_on_cuda_without_unsloth():
    pk = {k: v for k, v in ALL.items() if k != "unsloth"}
    plan = decide_plan(TrainSection(quantization="nf4"), make_probe(cuda_gib=24, packages=pk), SMALL)
    assert (plan.backend, plan.device) == ("hf", "cuda")


def test_auto_picks_mlx_on_apple_silicon():
    plan = decide_plan(TrainSection(max_seq_length=256, quantization="nf4"), make_probe(apple=True, ram_gib=16), SMALL)
    assert (plan.backend, plan.device) == ("mlx", "mps")


def test_auto_picks_hf_on_a_cpu_box():
    cpu_box = make_probe(ram_gib=24, packages={k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")})
    plan = decide_plan(TrainSection(max_seq_length=128), cpu_box,
                       tiny_facts())
    assert (plan.backend, plan.device, plan.dtype) == ("hf", "cpu", "float32")
    assert plan.micro_batch_size * plan.gradient_accumulation_steps == plan.effective_batch_size


def test_explicit_backend_that_cannot_run_names_the_install_command():
    pk = {k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")}
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(backend="unsloth"), make_probe(cuda_gib=24, packages=pk), SMALL)
    assert "pip install -e '.[cuda]'" in str(err.value)
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(backend="mlx"), make_probe(packages=pk), SMALL)
    assert ".[mlx]" in str(err.value)


def test_memory_refusal_collects_every_reason():
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(device="cuda", dtype="float16", max_seq_length=8192, micro_batch_size=1),
                    make_probe(cuda_gib=None, ram_gib=4, disk_gib=1), SMALL)
    msg = str(err.value)
    assert "cuda is not available" in msg
    assert "training needs about" in msg and "no single change fits" in msg
    assert "GiB free" in msg
    assert len(err.value.problems) >= 3


def test_auto_micro_batch_backs_off_to_fit_and_keeps_the_effective_batch():
    big = decide_plan(TrainSection(effective_batch_size=16, max_seq_length=2048), make_probe(cuda_gib=80), SMALL)
    small = decide_plan(TrainSection(effective_batch_size=16, max_seq_length=2048, quantization="nf4",
                                     gradient_checkpointing=True), make_probe(cuda_gib=24), SMALL)
    assert small.micro_batch_size <= big.micro_batch_size
    for plan in (big, small):
        assert plan.micro_batch_size * plan.gradient_accumulation_steps == 16
        assert plan.memory.total_gib <= plan.memory.budget_gib


def test_seed_configs_plan_on_their_target_hardware_without_weights():
    """Each seed config, validated and planned against a probe of the machine it was written for."""
    from lorapipe.config import load_config
    from tests.conftest import REPO_ROOT

    llama = facts("llama-3.1-8b")
    mistral = facts("mistral-7b")
    deepseek = facts("deepseek-coder-6.7b")
    cases = [("llama-3.1-8b-unsloth-cuda", make_probe(cuda_gib=24), llama, ("unsloth", "cuda", 2, 8)),
             ("mistral-7b-mlx-16gb", make_probe(apple=True, ram_gib=16), mistral, ("mlx", "mps", 1, 4))]
    tiny = tiny_facts()
    cpu_box = make_probe(ram_gib=24, packages={k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")})
    cases.append(("quickstart", cpu_box, tiny, ("hf", "cpu", 8, 1)))
    for profile, accumulation in (("conservative", 8), ("balanced", 16), ("quality", 32)):
        cases.append((f"deepseek-coder-6.7b-qlora-24gb-{profile}", make_probe(cuda_gib=24), deepseek,
                      ("hf", "cuda", 1, accumulation)))
    for name, hw, size, expected in cases:
        cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
        plan = decide_plan(cfg.train, hw, size)
        assert (plan.backend, plan.device, plan.micro_batch_size, plan.gradient_accumulation_steps) == expected, name
        assert plan.memory.total_gib < plan.memory.budget_gib
    # DPO of an 8B model on 24 GB: the plan fits it (two sequences per pair and the reference's logits counted)
    cfg = load_config(REPO_ROOT / "configs" / "llama-3.1-8b-dpo-24gb.yaml")
    from transformers import AutoConfig

    from lorapipe.hardware.facts import facts_from_config
    from tests.model_facts import CONFIGS

    dpo_facts = facts_from_config(AutoConfig.from_pretrained(str(CONFIGS / "llama-3.1-8b.json")), task="preference")
    full = plan_module.decide_plan(cfg.train, make_probe(cuda_gib=24), dpo_facts, cfg.evaluate, task="preference",
                                   user_set=plan_module.user_set_keys(cfg.train, cfg.evaluate))
    assert (full.train.backend, full.train.device, full.train.method) == ("hf", "cuda", "dpo")
    assert full.train.memory.total_gib < full.train.memory.budget_gib
    assert any(t.name.startswith("reference forward") for t in full.train.memory.terms)


def test_preference_methods_plan_on_the_backends_that_have_them_and_are_refused_with_the_fix_elsewhere():
    from transformers import AutoConfig

    from lorapipe.hardware.facts import facts_from_config
    from tests.model_facts import CONFIGS

    dpo_facts = facts_from_config(AutoConfig.from_pretrained(str(CONFIGS / "llama-3.1-8b.json")), task="preference")

    def preference_plan(train: TrainSection, machine):
        return plan_module.decide_plan(train, machine, dpo_facts, task="preference").train

    mac, cuda = make_probe(apple=True, ram_gib=128), make_probe(cuda_gib=80)
    # backend auto: unsloth on CUDA and mlx on a Mac train DPO; KTO on a Mac goes to hf, saying why
    assert preference_plan(TrainSection(method="dpo"), cuda).backend == "unsloth"
    mlx = preference_plan(TrainSection(method="dpo"), mac)
    assert mlx.backend == "mlx" and not any(t.name.startswith("reference forward") for t in mlx.memory.terms)
    kto = preference_plan(TrainSection(method="kto"), mac)
    assert kto.backend == "hf" and "mlx is installed but cannot train train.method kto" in \
        kto.reasons[0]
    with pytest.raises(PlanError) as err:  # every option mlx lacks, at once, with the fix
        preference_plan(TrainSection(backend="mlx", method="dpo",
                                     preference={"loss_type": "robust", "label_smoothing": 0.1}), mac)
    assert any(p.startswith("train.preference.loss_type=robust is not available on the mlx backend; allowed there: "
                            "sigmoid, ipo, hinge") for p in err.value.problems)
    assert any(p.startswith("train.preference.label_smoothing=0.1 is not available on the mlx backend")
               for p in err.value.problems)
    with pytest.raises(PlanError, match="train.backend=mlx cannot train train.method kto: .*"
                                        "no KTO; set train.backend: hf or unsloth or auto"):
        preference_plan(TrainSection(backend="mlx", method="kto"), mac)


def test_continuing_an_adapter_is_refused_where_the_backend_cannot():
    with pytest.raises(PlanError, match="init_adapter"):
        decide_plan(TrainSection(init_adapter="runs/old/adapter"), make_probe(apple=True, ram_gib=64), SMALL)
    with pytest.raises(PlanError) as err:  # options only hf implements are refused on other backends, all at once
        decide_plan(TrainSection(eval_steps=10, early_stopping_patience=2, packing=True), make_probe(cuda_gib=24),
                    SMALL)
    assert {"train.eval_steps", "train.early_stopping_patience", "train.packing"} <= {
        p.split(" ")[0] for p in err.value.problems}
    plan = decide_plan(TrainSection(init_adapter="runs/old/adapter", backend="hf", max_seq_length=128),
                       make_probe(apple=True, ram_gib=64), SMALL)
    assert plan.backend == "hf"


def test_a_plan_stored_by_an_older_lorapipe_still_loads():
    """A model version trained before the GB -> GiB field rename (and before phases named their row length) keeps
    its plan readable in lineage and the dashboard: written by ede5730's decide_plan, read by this one."""
    import json
    from pathlib import Path

    from lorapipe.hardware.plan import MERGE_CHECK_TOKENS, RunPlan

    stored = json.loads((Path(__file__).parent / "data" / "stored" / "run_plan_ede5730.json").read_text())
    assert "predicted_peak_gb" in stored["run_plan"]["evaluate"]  # the fixture really is the old shape
    plan = RunPlan.model_validate(stored["run_plan"])
    assert plan.evaluate.predicted_peak_gib == stored["run_plan"]["evaluate"]["predicted_peak_gb"] > 0
    assert plan.train.memory.total_gib == stored["run_plan"]["train"]["memory"]["total_gb"] > 0
    assert (plan.evaluate.max_seq_length, plan.merge.max_seq_length) == (1024, min(1024, MERGE_CHECK_TOKENS))
    probe = HardwareProbe.model_validate(stored["probe"])
    assert (probe.ram_total_gib, probe.cuda_devices[0].total_memory_gib) == (64.0, 24.0)


def test_tokens_a_built_in_template_adds_plan_on_hf_and_are_refused_where_no_embedding_row_trains():
    """model.chat_template: llama3 on a vocabulary without its header tokens: the facts carry the added tokens (the
    preflight step reads them off the validation report); hf trains their rows and counts them, mlx is refused."""
    with_tokens = SMALL.model_copy(update={"added_tokens": 3})
    planned = decide_plan(TrainSection(backend="hf", device="cpu"), make_probe(ram_gib=128), with_tokens)
    assert any(t.name == "new token rows (trainable) and their gradients" for t in planned.memory.terms)
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(backend="mlx"), make_probe(apple=True, ram_gib=128), with_tokens)
    assert any(p.startswith("model.chat_template adds 3 token(s) to the vocabulary") and "set train.backend: hf" in p
               for p in err.value.problems)
