"""The unsloth backend on the tiny model.

`import unsloth` patches transformers, PEFT and TRL for the whole process, so every training run here happens in
a child Python process (a small driver script); this test process never imports unsloth and checks the outputs
with stock transformers + PEFT.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.monitor_checks import assert_monitor_outputs

if importlib.util.find_spec("unsloth") is None:
    pytest.skip("unsloth is not installed (pip install -e '.[cuda]')", allow_module_level=True)

pytestmark = [pytest.mark.unsloth, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
ROWS = 32
STEPS = 6
RESUMED_STEPS = 9

DRIVER = r'''
import json, sys
from pathlib import Path

from lorapipe.backends.unsloth import UnslothBackend
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.formats import read_records
from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan
from lorapipe.logs import show_on_console
from lorapipe.tasks.sft import SFT

show_on_console()
a = json.loads(sys.argv[1])
records = read_records([a["data"]]).records[: a["rows"]]
train = ConversationDataset(records, name="train")
t = TrainSection(backend="unsloth", device=a["device"], max_steps=a["steps"], save_steps=a["save_steps"],
                 learning_rate=1e-2, warmup_steps=0, logging_steps=1, lora={"r": 8, "alpha": 16})
memory = MemoryEstimate(weights_gib=0, lora_and_optimizer_gib=0, activations_gib=0, total_gib=0, budget_gib=1)
plan = TrainingPlan(backend="unsloth", device=a["device"], dtype=a["dtype"], quantization=a["quantization"],
                    micro_batch_size=4, gradient_accumulation_steps=1, effective_batch_size=4, max_seq_length=256,
                    gradient_checkpointing=a["gradient_checkpointing"], optimizer=a["optimizer"], memory=memory,
                    reasons=[], warnings=[])
info = UnslothBackend().train(SFT(), ModelSection(name_or_path=a["model"]), t, 7, plan, train,
                              ConversationDataset([], name="eval"), Path(a["work"]), Path(a["adapter"]))
print("ADAPTER_INFO " + info.model_dump_json(), flush=True)
'''


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(driver: Path, model_dir: Path, work: Path, adapter: Path, steps: int = STEPS, save_steps: int = 3,
         device: str = "cpu", dtype: str = "float32", quantization: str = "none", optimizer: str = "adamw_torch",
         gradient_checkpointing: bool = False) -> tuple[dict, str]:
    """Train in a child process; (AdapterInfo as a dict, the child's stdout+stderr)."""
    args = {"data": str(DATA), "rows": ROWS, "model": str(model_dir), "work": str(work), "adapter": str(adapter),
            "steps": steps, "save_steps": save_steps, "device": device, "dtype": dtype,
            "quantization": quantization, "optimizer": optimizer, "gradient_checkpointing": gradient_checkpointing}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(driver), json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + "\n" + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ADAPTER_INFO ")]
    assert proc.returncode == 0 and lines, f"unsloth training failed (rc {proc.returncode}):\n{output[-6000:]}"
    return json.loads(lines[-1][len("ADAPTER_INFO "):]), output


def _load(model_dir: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _logits(model, model_dir: Path):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("What did Apple announce at WWDC25 for developers?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora_b(model) -> list:
    return [p for n, p in model.named_parameters() if "lora_B" in n]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lorapipe.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", [DATA])


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "train_unsloth.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def trained(tiny, driver, tmp_path_factory):
    """One LoRA run (fp32, no quantization): (info, output, work_dir, adapter_dir, base digest before training)."""
    root = tmp_path_factory.mktemp("run")
    before = _tree_digest(tiny)
    info, output = _run(driver, tiny, root / "work", root / "adapter")
    return info, output, root / "work", root / "adapter", before


def test_unsloth_adapter_is_a_peft_folder_that_changes_the_model(trained, tiny):
    import torch

    info, output, _, adapter, before = trained
    assert "Unsloth" in output  # the child really went through unsloth (its CPU fallback here)
    assert info["backend"] == "unsloth" and info["device"] == "cpu"
    assert info["steps"] == STEPS and info["train_loss"] is not None and info["train_tokens"] > 0
    assert info["tokens_per_second"] > 0 and info["peak_memory_gib"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_log.jsonl",
                 "metrics.jsonl", "metrics.csv", "loss.png"):  # the same training monitor as the hf backend
        assert (adapter / name).exists(), name
    assert "checkpoint saved: step 3" in output and "checkpoint saved: step 6" in output
    assert_monitor_outputs(adapter, list(range(1, STEPS + 1)), STEPS, output)  # as for hf and mlx
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    log = [json.loads(ln) for ln in (adapter / "training_log.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in log)

    assert _tree_digest(tiny) == before, "training wrote to the base model's folder"
    base = _load(tiny)
    tuned = _load(tiny, adapter)
    lora_b = _lora_b(tuned)
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "lora_B weights are still zero: nothing trained"
    tuned_base = dict(tuned.get_base_model().named_parameters())
    for name, p in base.named_parameters():  # PeftModel's base weights are the ones on disk, untouched
        key = next(k for k in tuned_base if k.replace("base_layer.", "") == name)
        assert torch.equal(p, tuned_base[key]), name
    assert not torch.allclose(_logits(base, tiny), _logits(tuned, tiny), atol=1e-5)


def test_unsloth_adapter_metadata(trained):
    from lorapipe.training.adapter import read_adapter_metadata

    info, _, _, adapter, _ = trained
    meta = read_adapter_metadata(adapter)
    assert meta["result"]["backend"] == "unsloth"
    assert meta["result"]["steps"] == info["steps"]
    assert meta["plan"]["backend"] == "unsloth"
    assert meta["quantization_applied"] == "none"
    assert meta["optimizer_applied"].startswith("adamw")
    assert "unsloth" not in sys.modules, "unsloth was imported into the test process: it patches libraries globally"


def test_unsloth_resumes_from_last_checkpoint(trained, tiny, driver):
    _, _, work, adapter, _ = trained
    info, output = _run(driver, tiny, work, adapter.parent / "adapter-resumed", steps=RESUMED_STEPS)
    assert "resuming from" in output and f"checkpoint-{STEPS}" in output
    assert info["resumed_from"] is not None and info["resumed_from"].endswith(f"checkpoint-{STEPS}")
    assert info["steps"] == RESUMED_STEPS
    assert f"checkpoint saved: step {RESUMED_STEPS}" in output


def test_unsloth_qlora_nf4_on_cpu(tiny, driver, tmp_path):
    """QLoRA through the same path (load_in_4bit): bitsandbytes' CPU backend runs NF4 here."""
    from lorapipe.training.adapter import read_adapter_metadata

    info, output = _run(driver, tiny, tmp_path / "work", tmp_path / "adapter", quantization="nf4")
    meta = read_adapter_metadata(tmp_path / "adapter")
    if meta["quantization_applied"] != "nf4":
        reason = next((ln for ln in output.splitlines() if "4-bit" in ln), "no reason printed")
        pytest.skip(f"unsloth loaded {meta['quantization_applied']} weights instead of nf4 on this CPU: {reason}")
    assert "4-bit = True" in output
    assert info["steps"] == STEPS and info["backend"] == "unsloth"
    tuned = _load(tiny, tmp_path / "adapter")  # a plain LoRA adapter: it loads onto the full-precision base too
    assert any(p.abs().max() > 0 for p in _lora_b(tuned))
    import torch

    assert not torch.allclose(_logits(_load(tiny), tiny), _logits(tuned, tiny), atol=1e-5)


def test_unsloth_missing_raises_backend_unavailable(monkeypatch, tmp_path):
    """Without unsloth importable, train() says what to install (sys.modules[...] = None: import fails)."""
    from lorapipe.backends.base import BackendUnavailable
    from lorapipe.backends.unsloth import UnslothBackend
    from lorapipe.tasks.sft import SFT

    monkeypatch.setitem(sys.modules, "unsloth", None)
    with pytest.raises(BackendUnavailable, match=r"pip install -e '\.\[cuda\]'"):
        UnslothBackend().train(SFT(), None, None, 0, None, None, None, tmp_path, tmp_path / "adapter")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_unsloth_qlora_nf4_adamw8bit_on_cuda(tiny, driver, tmp_path):
    from lorapipe.training.adapter import read_adapter_metadata

    info, output = _run(driver, tiny, tmp_path / "work", tmp_path / "adapter", device="cuda", dtype="bfloat16",
                        quantization="nf4", optimizer="adamw_8bit", gradient_checkpointing=True)
    meta = read_adapter_metadata(tmp_path / "adapter")
    assert info["device"] == "cuda" and info["steps"] == STEPS and info["peak_memory_gib"] > 0
    assert meta["quantization_applied"] == "nf4", output[-3000:]
    assert "8bit" in meta["optimizer_applied"]
    tuned = _load(tiny, tmp_path / "adapter")
    assert any(p.abs().max() > 0 for p in _lora_b(tuned))


PREFERENCE_DRIVER = r'''
import json, sys
from pathlib import Path

from lorapipe.backends.unsloth import UnslothBackend
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan
from lorapipe.logs import show_on_console
from lorapipe.tasks import get_task
from tests.test_preference_train import learnable_pairs

show_on_console()
a = json.loads(sys.argv[1])
pairs = learnable_pairs()[: a["rows"]]
memory = MemoryEstimate(weights_gib=0, lora_and_optimizer_gib=0, activations_gib=0, total_gib=0, budget_gib=1)
for method, steps in a["methods"].items():
    t = TrainSection(backend="unsloth", device="cpu", method=method, max_steps=steps, save_steps=1000,
                     learning_rate=5e-3, warmup_steps=0, logging_steps=1, lora={"r": 8, "alpha": 16}, max_seq_length=96)
    plan = TrainingPlan(backend="unsloth", device="cpu", dtype="float32", quantization="none", method=method,
                        micro_batch_size=4, gradient_accumulation_steps=2, effective_batch_size=8, max_seq_length=96,
                        gradient_checkpointing=False, optimizer="adamw_torch", memory=memory, reasons=[], warnings=[])
    out = Path(a["root"]) / method
    info = UnslothBackend().train(get_task("preference"), ModelSection(name_or_path=a["model"]), t, 7, plan,
                                  ConversationDataset(pairs), ConversationDataset([], name="eval"), out / "work",
                                  out / "adapter")
    print("ADAPTER_INFO " + json.dumps({"method": method, **json.loads(info.model_dump_json())}), flush=True)
'''


@pytest.fixture(scope="module")
def preference_runs(tiny, tmp_path_factory):
    """DPO (long enough to learn the learnable pairs), KTO and ORPO (a few steps) through the unsloth backend, in one
    child process: {method: (info, adapter folder)}, and the child's output."""
    root = tmp_path_factory.mktemp("preference")
    driver = root / "train_unsloth_preference.py"
    driver.write_text(PREFERENCE_DRIVER)
    args = {"rows": 80, "model": str(tiny), "root": str(root), "methods": {"dpo": 20, "kto": 3, "orpo": 3}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(driver), json.dumps(args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, f"unsloth preference training failed (rc {proc.returncode}):\n{output[-6000:]}"
    infos = [json.loads(ln[len("ADAPTER_INFO "):]) for ln in proc.stdout.splitlines() if ln.startswith("ADAPTER_INFO ")]
    return {i["method"]: (i, root / i["method"] / "adapter") for i in infos}, output


def test_unsloth_dpo_reference_is_the_starting_model_and_the_pairs_are_learnt(preference_runs, tiny):
    """DPO through unsloth's FastLanguageModel: step 1 scores the policy against itself (ln 2, no margin), and the
    tuned adapter ranks held-out chosen answers above rejected ones better than the starting model."""
    from lorapipe.config import EvaluateSection
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.hardware.plan import PhasePlan
    from lorapipe.tasks import get_task
    from lorapipe.training.adapter import read_adapter_metadata
    from tests.test_preference_train import learnable_pairs

    runs, output = preference_runs
    info, adapter = runs["dpo"]
    assert "Unsloth" in output and info["backend"] == "unsloth" and info["steps"] == 20
    log = [json.loads(ln) for ln in (adapter / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.6931472, abs=1e-5) and log[0]["rewards/margins"] == pytest.approx(0.0)
    assert [e for e in log if "rewards/margins" in e][-1]["rewards/margins"] > 0
    meta = read_adapter_metadata(adapter)
    assert meta["preference"]["method"] == "dpo" and meta["preference"]["reference"] == "starting_model"
    # on CPU unsloth's fallback keeps TRL's own trainers (it patches them on CUDA: the GPU test below)
    assert meta["trainer_class"] == "trl.trainer.dpo_trainer.DPOTrainer"
    assert any(p.abs().max() > 0 for p in _lora_b(_load(tiny, adapter)))
    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=8, max_seq_length=96, reason="test")
    metrics = get_task("preference").evaluate(
        str(adapter), ConversationDataset(learnable_pairs()[80:], name="test"), phase,
        EvaluateSection(max_samples=16, generation_samples=0, max_new_tokens=8))
    assert metrics.tuned.preference_accuracy > metrics.base.preference_accuracy
    assert metrics.tuned.reward_margin > 0
    assert "unsloth" not in sys.modules


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_unsloth_trains_kto_and_orpo(preference_runs, tiny, method):
    import math

    from lorapipe.training.adapter import read_adapter_metadata

    runs, _ = preference_runs
    info, adapter = runs[method]
    assert info["steps"] == 3 and math.isfinite(info["train_loss"]) and info["train_tokens"] > 0
    meta = read_adapter_metadata(adapter)
    assert meta["preference"]["method"] == method
    assert meta["preference"]["reference"] == (None if method == "orpo" else "starting_model")
    assert any(p.abs().max() > 0 for p in _lora_b(_load(tiny, adapter)))


@pytest.mark.gpu
def test_unsloth_patches_the_preference_trainers_on_cuda():
    """On CUDA `import unsloth` replaces TRL's DPO/KTO/ORPO trainers with its compiled ones; lorapipe must pick those
    up through `preference_trainer`. Needs a GPU (none here)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: unsloth patches TRL's trainers only there (its CPU fallback keeps TRL's own)")
    code = ("import unsloth\nfrom lorapipe.tasks.preference import preference_trainer\n"
            "print([preference_trainer(m)[0].__module__ for m in ('dpo', 'kto', 'orpo')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("unsloth_compiled_cache") == 3, out.stdout
