"""The hf backend's training features on the tiny model, each checked by its outcome: bit-identical resume after a
crash, continuing an adapter, evaluation with early stopping, length grouping and padding-free packing, monitoring
files, the CUDA out-of-memory backoff (simulated: no GPU here) and data parallelism over two CPU processes."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorapipe.backends.hf import HFBackend
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan
from lorapipe.tasks.sft import SFT
from lorapipe.training.monitoring import METRIC_COLUMNS, PLOTS
from tests.conftest import Tee
from tests.monitor_checks import assert_monitor_outputs

pytestmark = pytest.mark.slow  # every test here trains

REPO = Path(__file__).resolve().parents[1]
SEQ = 128
SEED = 7
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}  # dropout > 0: resume must restore the dropout RNG too


def make_plan(micro_batch: int = 4, accumulation: int = 2) -> TrainingPlan:
    memory = MemoryEstimate(weights_gib=0, lora_and_optimizer_gib=0, activations_gib=0, total_gib=0, budget_gib=1)
    return TrainingPlan(backend="hf", device="cpu", dtype="float32", quantization="none", micro_batch_size=micro_batch,
                        gradient_accumulation_steps=accumulation, effective_batch_size=micro_batch * accumulation,
                        max_seq_length=SEQ, gradient_checkpointing=False, optimizer="adamw_torch", memory=memory,
                        reasons=[], warnings=[])


def resume_cfg(**kw) -> TrainSection:
    """32 rows / effective batch 8 = 4 steps an epoch: 10 steps cross two epoch boundaries, the crash at step 7
    resumes from checkpoint-5, in the middle of the second epoch."""
    base = dict(max_steps=10, save_steps=5, save_total_limit=3, learning_rate=5e-3, warmup_steps=2, logging_steps=2,
                lora=LORA)
    return TrainSection(**{**base, **kw})


def run(env, name: str, t: TrainSection, plan: TrainingPlan | None = None, train=None, eval=None,  # noqa: A002
        callbacks=None, adapter: str = "adapter"):
    """Train into env.root/name; returns (info, stdout). Output is also passed through (visible on failure)."""
    out = Tee(sys.stdout)
    with contextlib.redirect_stdout(out):
        info = HFBackend().train(SFT(), env.model, t, SEED, plan or make_plan(), train or env.train,
                                 env.eval if eval is None else eval, env.root / name, env.root / name / adapter,
                                 extra_callbacks=callbacks)
    return info, out.getvalue()


def meta_of(info) -> dict:
    return json.loads((Path(info.path) / "lorapipe_adapter.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


class CrashAfter(TrainerCallback):
    """Simulates a crash: raises at the end of optimizer step `step` (after earlier checkpoints were written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


@pytest.fixture(scope="module")
def env(tiny_model_dir, quickstart_records, tmp_path_factory):
    recs = quickstart_records
    return SimpleNamespace(
        model=ModelSection(name_or_path=str(tiny_model_dir)),
        train=ConversationDataset(recs[:32], name="train"),
        eval=ConversationDataset(recs[32:40], name="eval"),
        new=ConversationDataset(recs[40:72], name="new"),
        root=tmp_path_factory.mktemp("hf-features"),
    )


@pytest.fixture(scope="module")
def uninterrupted(env):
    """Uninterrupted reference runs, default sampler and length-grouped."""
    out = {}
    for variant, grouped in (("default", False), ("group_by_length", True)):
        info, stdout = run(env, f"full-{variant}", resume_cfg(group_by_length=grouped))
        out[variant] = SimpleNamespace(info=info, stdout=stdout, meta=meta_of(info))
    return out


# -- 1. bit-identical resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["default", "group_by_length"])
def test_resume_after_a_crash_is_bit_identical(env, uninterrupted, variant):
    t = resume_cfg(group_by_length=variant == "group_by_length")
    with pytest.raises(RuntimeError, match="simulated crash after step 7"):
        run(env, f"crash-{variant}", t, callbacks=[CrashAfter(7)])
    ckpt = env.root / f"crash-{variant}" / "checkpoints" / "checkpoint-5"
    assert ckpt.is_dir() and not (ckpt.parent / "checkpoint-10").exists()

    info, out = run(env, f"crash-{variant}", t)
    assert f"resuming from {ckpt}" in out and info.resumed_from == str(ckpt)
    assert "checkpoint saved: step 10" in out and info.steps == 10

    ref = weights(Path(uninterrupted[variant].info.path))
    got = weights(Path(info.path))
    assert set(got) == set(ref) and any("lora_B" in k for k in ref)
    assert all(ref[k].abs().sum() > 0 for k in ref if "lora_B" in k), "the adapter must have moved"
    unequal = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not unequal, f"resumed adapter differs from the uninterrupted one in {unequal[:3]}"
    # the metrics of the resumed run continue the crashed run's rows up to the checkpoint, no duplicate steps
    rows = [json.loads(x) for x in (Path(info.path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]


# -- 4. batching ---------------------------------------------------------------------------------------------------

def test_group_by_length_pads_less_than_random_batches(uninterrupted):
    plain = uninterrupted["default"].meta["padding_waste"]
    grouped = uninterrupted["group_by_length"].meta["padding_waste"]
    assert plain["batches"] == grouped["batches"] == 20  # 10 steps x 2 micro-batches, none counted twice
    assert plain["padded_tokens"] > 0 and not plain["padding_free"]
    assert grouped["fraction"] < plain["fraction"]
    assert uninterrupted["group_by_length"].meta["batching"]["group_by_length"] is True


def test_packing_is_padding_free_and_keeps_the_assistant_labels(env, tiny_model_dir):
    seen = {}

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            ds = train_dataloader.dataset
            seen["columns"] = set(ds.column_names)
            seen["rows"] = len(ds)
            seen["multi"] = sum(len(s) > 1 for s in ds["seq_lengths"])
            seen["masked"] = sum(x == -100 for row in ds["labels"] for x in row)
            seen["use_cache"] = model.config.use_cache

    t = TrainSection(max_steps=4, save_steps=100, packing=True, learning_rate=5e-3, warmup_steps=0, logging_steps=2,
                     lora=LORA)
    info, _ = run(env, "packing", t, plan=make_plan(2, 2), callbacks=[Peek()])
    assert info.steps == 4
    assert {"input_ids", "labels", "seq_lengths"} <= seen["columns"]
    assert seen["rows"] < len(env.train) and seen["multi"] > 0  # rows were packed together
    assert seen["masked"] > 0  # the prompt tokens stay out of the loss after packing
    assert seen["use_cache"] is False
    waste = meta_of(info)["padding_waste"]
    # packs stay rows of a micro-batch (right-padded to the longest pack), counted from the collator's real tokens
    assert waste["padding_free"] is True and waste["batches"] == 8 and waste["real_tokens"] > 0
    assert waste["fraction"] < 0.25

    # what makes padding-free safe: restarting position ids (no mask) keep the rows from attending to each other
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    rows = [{"input_ids": list(range(5, 25))}, {"input_ids": list(range(40, 52))}]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0] for r in rows])
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)

    # lorapipe keeps each pack a row (sdpa/eager attend within a row, not over the whole flattened micro-batch):
    # two packs, the first of two sequences; each sequence's logits are its own
    from lorapipe.backends.trainer import REAL_TOKENS
    from lorapipe.tasks.sft import PackedRowsCollator

    a, b, c = list(range(5, 25)), list(range(40, 52)), list(range(60, 67))
    packs = [{"input_ids": a + b, "labels": a + b, "seq_lengths": [len(a), len(b)]},
             {"input_ids": c, "labels": c, "seq_lengths": [len(c)]}]
    rows_batch = PackedRowsCollator(DataCollatorForLanguageModeling(pad_token_id=0), pad_token_id=0)(packs)
    assert rows_batch["input_ids"].shape == (2, len(a) + len(b)) and "attention_mask" not in rows_batch
    assert rows_batch[REAL_TOKENS] == len(a) + len(b) + len(c)
    assert rows_batch["labels"][0, len(a)] == -100  # the second sequence's first token is not predicted from the first
    with torch.no_grad():
        logits = model(input_ids=rows_batch["input_ids"], position_ids=rows_batch["position_ids"],
                       use_cache=False).logits
        own = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0] for x in (a, b, c)]
    assert torch.allclose(logits[0, :len(a) + len(b)], torch.cat(own[:2]), atol=1e-5)
    assert torch.allclose(logits[1, :len(c)], own[2], atol=1e-5)


# -- 5. monitoring -------------------------------------------------------------------------------------------------

def test_metrics_files_plots_and_progress_lines(uninterrupted):
    ref = uninterrupted["default"]
    folder = Path(ref.info.path)
    assert_monitor_outputs(folder, [2, 4, 6, 8, 10], 10, ref.stdout)  # as for unsloth and mlx
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    for r in rows:
        assert set(r) == set(METRIC_COLUMNS)
        assert r["loss"] > 0 and r["learning_rate"] > 0 and r["grad_norm"] > 0 and r["eval_loss"] is None
        assert r["tokens_per_second"] > 0 and r["memory_gib"] > 0 and r["epoch"] > 0
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    with open(folder / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == METRIC_COLUMNS
        table = list(reader)
    assert [int(r["step"]) for r in table] == [2, 4, 6, 8, 10]
    assert float(table[-1]["loss"]) == pytest.approx(rows[-1]["loss"]) and table[-1]["eval_loss"] == ""
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    progress = re.findall(r"^step (\d+)/10 loss \d+\.\d\d lr \d\.\de[-+]\d\d [\d.]+[kMG]? tok/s "
                          r"mem \d+(?:\.\d\d GiB| MiB) "
                          r"eta \d+:\d\d:\d\d$", ref.stdout, re.M)
    assert progress == ["2", "4", "6", "8", "10"]
    assert "checkpoint saved: step 5" in ref.stdout and "{'loss'" not in ref.stdout  # compact lines only


# -- 2. continuing an adapter --------------------------------------------------------------------------------------

def test_init_adapter_continues_the_given_adapter_on_new_data(env, uninterrupted):
    from peft import get_peft_model_state_dict

    source = Path(uninterrupted["default"].info.path)
    start = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            start.update({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})

    # train.lora says r=16: the given adapter's own shape (r=8) is what is trained, no new LoRA layers
    t = TrainSection(max_steps=4, save_steps=100, learning_rate=5e-3, warmup_steps=0, logging_steps=2,
                     init_adapter=str(source), lora={"r": 16, "alpha": 16})
    info, out = run(env, "continued", t, train=env.new, callbacks=[AtStart()])
    given = weights(source)
    assert set(start) == set(given) and all(torch.equal(start[k], given[k]) for k in given)
    final = weights(Path(info.path))
    assert set(final) == set(given) and all(final[k].shape == given[k].shape for k in given)
    assert any(not torch.equal(final[k], given[k]) for k in given if "lora_B" in k), "training must move the adapter"
    meta = meta_of(info)
    assert meta["init_adapter"] == str(source.resolve()) and meta["data_fingerprint"] == env.new.fingerprint
    assert json.loads((Path(info.path) / "adapter_config.json").read_text())["r"] == 8
    assert "keeps its own LoRA shape (r=8" in out


# -- 3. evaluation, early stopping, best model ---------------------------------------------------------------------

def test_early_stopping_stops_when_eval_loss_cannot_improve_and_keeps_the_best(env):
    # lr 1e-30: the LoRA update is below float32 resolution of the activations, so eval loss repeats exactly;
    # patience 1 stops at the second evaluation, and the best (first) checkpoint is loaded back
    t = TrainSection(max_steps=12, eval_steps=2, save_steps=2, save_total_limit=5, early_stopping_patience=1,
                     load_best_model_at_end=True, learning_rate=1e-30, warmup_steps=0, logging_steps=2, lora=LORA)
    info, out = run(env, "early-stop", t)
    assert info.steps == 4 < t.max_steps
    assert re.findall(r"^step (\d+)/12 eval_loss \d+\.\d{4}", out, re.M) == ["2", "4"]
    log = [json.loads(x) for x in (Path(info.path) / "training_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and evals[0]["eval_loss"] == evals[1]["eval_loss"]
    metrics = [json.loads(x) for x in (Path(info.path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["eval_loss"] is not None] == [2, 4]
    ev = meta_of(info)["evaluation"]
    assert ev["stopped_early"] is True and ev["best_checkpoint"].endswith("checkpoint-2")
    ckpts = env.root / "early-stop" / "checkpoints"
    final, best, last = weights(Path(info.path)), weights(ckpts / "checkpoint-2"), weights(ckpts / "checkpoint-4")
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(final[k], last[k]) for k in last)


def test_eval_steps_need_an_eval_split(env):
    with pytest.raises(ValueError, match="non-empty eval"):
        HFBackend().train(SFT(), env.model, TrainSection(eval_steps=2), SEED, make_plan(), env.train,
                          ConversationDataset([], name="eval"), env.root / "no-eval", env.root / "no-eval" / "adapter")


# -- 6. CUDA out-of-memory backoff ---------------------------------------------------------------------------------

class FakeOOM(TrainerCallback):
    """No GPU here: a `torch.cuda.OutOfMemoryError` is raised at the end of step 1 of the first attempt only, the way
    a real one would surface from the forward/backward of an early step. Records each attempt's batch geometry."""

    def __init__(self, every_attempt: bool = False):
        self.every_attempt = every_attempt
        self.attempts: list[tuple[int, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.attempts.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and (self.every_attempt or len(self.attempts) == 1):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def test_oom_in_the_first_steps_halves_the_micro_batch_and_keeps_the_effective_batch(env):
    oom = FakeOOM()
    t = TrainSection(max_steps=3, save_steps=100, learning_rate=5e-3, warmup_steps=0, logging_steps=1, lora=LORA)
    info, out = run(env, "oom", t, plan=make_plan(4, 2), callbacks=[oom])
    assert oom.attempts == [(4, 2), (2, 4)]  # (micro-batch, accumulation): the effective batch stays 8
    assert "CUDA out of memory at step 1 with micro-batch 4: retrying with micro-batch 2 x accumulation 4" in out
    meta = meta_of(info)
    assert meta["oom_backoff"] == [{"from": 4, "to": 2, "step": 1, "effective_batch_size": 8,
                                    "gradient_accumulation_steps": {"from": 2, "to": 4}}]
    plan = meta["plan"]
    assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"], plan["effective_batch_size"]) == (2, 4, 8)
    assert info.steps == 3 and meta["padding_waste"]["batches"] == 3 * 4  # the retry's micro-batches only


def test_oom_at_micro_batch_one_is_raised_with_a_hint(env):
    t = TrainSection(max_steps=3, save_steps=100, learning_rate=5e-3, warmup_steps=0, logging_steps=1, lora=LORA)
    with pytest.raises(torch.cuda.OutOfMemoryError) as err:
        run(env, "oom-1", t, plan=make_plan(1, 2), callbacks=[FakeOOM(every_attempt=True)])
    assert any("lower train.max_seq_length" in n for n in getattr(err.value, "__notes__", []))


# -- 7. data parallel over two CPU processes -----------------------------------------------------------------------

DDP_DRIVER = r'''
import hashlib, json, os, sys
from pathlib import Path

from transformers import TrainerCallback

from lorapipe.backends.hf import HFBackend
from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.formats import read_records
from lorapipe.hardware.plan import MemoryEstimate, TrainingPlan
from lorapipe.logs import show_on_console
from lorapipe.tasks.sft import SFT

show_on_console()
a = json.loads(sys.argv[1])
train = ConversationDataset(read_records([a["data"]]).records[:32], name="train")


class RankReport(TrainerCallback):
    """Each rank writes what it did: micro-batches it trained on, and a digest of its LoRA weights at the end."""

    def __init__(self):
        self.batches = 0

    def on_substep_end(self, args, state, control, **kw):
        self.batches += 1

    def on_step_end(self, args, state, control, **kw):
        self.batches += 1

    def on_train_end(self, args, state, control, model=None, **kw):
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
        Path(a["out"], f"rank{args.process_index}.json").write_text(json.dumps(
            {"rank": args.process_index, "world_size": args.world_size, "batches": self.batches,
             "steps": state.global_step, "lora_sha": h.hexdigest()}))


memory = MemoryEstimate(weights_gib=0, lora_and_optimizer_gib=0, activations_gib=0, total_gib=0, budget_gib=1)
# the plan is decided where the probe sees WORLD_SIZE (set by torchrun): data parallel over the ranks
plan = TrainingPlan(backend="hf", device="cpu", dtype="float32", quantization="none", micro_batch_size=2,
                    gradient_accumulation_steps=2, effective_batch_size=4, max_seq_length=96,
                    gradient_checkpointing=False, optimizer="adamw_torch", world_size=int(os.environ["WORLD_SIZE"]),
                    memory=memory, reasons=[], warnings=[])
t = TrainSection(max_steps=4, save_steps=4, learning_rate=5e-3, warmup_steps=0, logging_steps=2,
                 lora={"r": 8, "alpha": 16})
rank = int(os.environ["RANK"])
# every rank is given its own adapter folder: only the main process may write one
info = HFBackend().train(SFT(), ModelSection(name_or_path=a["model"]), t, 7, plan, train,
                         ConversationDataset([], name="eval"), Path(a["out"]) / "work",
                         Path(a["out"]) / f"adapter-rank{rank}", extra_callbacks=[RankReport()])
print(f"rank {rank} done: steps {info.steps}", flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_on_two_cpu_processes(tiny_model_dir, tmp_path):
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    args = json.dumps({"data": str(REPO / "data/quickstart/wwdc25_train_slice.jsonl"), "model": str(tiny_model_dir),
                       "out": str(out)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["steps"] == 4 and r["batches"] == 4 * 2 for r in ranks)  # both ranks trained every step
    assert ranks[0]["lora_sha"] == ranks[1]["lora_sha"]  # gradients were all-reduced: one model on both ranks
    assert "rank 0 done: steps 4" in proc.stdout and "rank 1 done: steps 4" in proc.stdout
    assert sorted(p.name for p in out.glob("adapter-*")) == ["adapter-rank0"]  # only the main process saved
    meta = json.loads((out / "adapter-rank0" / "lorapipe_adapter.json").read_text())
    assert meta["world_size"] == 2 and (out / "adapter-rank0" / "adapter_model.safetensors").exists()
    ckpt = out / "work" / "checkpoints" / "checkpoint-4"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert proc.stdout.count("checkpoint saved: step 4") == 1
