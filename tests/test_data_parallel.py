"""More than one process: the plan decides how many (train.processes and the probe's GPUs), the train step launches
them itself (torchrun), and what they train is one adapter with the effective batch of one process.

The plan tests build probes by hand (a 4-GPU box runs here as plain data). The launch tests run the pipeline's train
step function on two CPU gloo processes with the tiny model: real ranks, real files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PlanError
from tests.model_facts import tiny_facts
from tests.monitor_checks import assert_monitor_outputs
from tests.test_plan import ALL, SMALL, decide_plan, make_probe

NO_UNSLOTH = {k: v for k, v in ALL.items() if k != "unsloth"}
CPU_ONLY = {k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")}
TINY = tiny_facts()


# -- the plan decides the process count, once --------------------------------------------------------------------

def test_auto_trains_one_process_per_cuda_gpu_and_keeps_the_effective_batch():
    plan = decide_plan(TrainSection(effective_batch_size=16, max_seq_length=2048),
                       make_probe(cuda_gib=80, gpus=4, packages=NO_UNSLOTH), SMALL)
    assert (plan.backend, plan.device, plan.world_size) == ("hf", "cuda", 4)
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == 16 == plan.effective_batch_size
    assert any("one per CUDA GPU" in r for r in plan.reasons)
    for gpus in (1, 0):  # one GPU, or none: one process
        one = decide_plan(TrainSection(max_seq_length=2048), make_probe(cuda_gib=80 if gpus else None, gpus=gpus,
                                                                        packages=NO_UNSLOTH), SMALL if gpus else TINY)
        assert one.world_size == 1 and any(r.startswith("1 process") for r in one.reasons)


def test_a_small_effective_batch_is_shared_out_not_multiplied():
    plan = decide_plan(TrainSection(effective_batch_size=4, max_seq_length=512),
                       make_probe(cuda_gib=80, gpus=4, packages=NO_UNSLOTH), SMALL)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.world_size) == (1, 1, 4)
    assert plan.effective_batch_size == 4


def test_auto_on_a_multi_gpu_box_with_a_single_process_backend_says_what_is_left_unused():
    plan = decide_plan(TrainSection(max_seq_length=2048), make_probe(cuda_gib=80, gpus=4), SMALL)
    assert (plan.backend, plan.world_size) == ("unsloth", 1)
    assert any("1 of the 4 GPUs" in w and "train.backend: hf" in w for w in plan.warnings)


def test_explicit_processes_on_the_cpu_train_with_gloo():
    from lorapipe.backends.trainer import trainer_arguments

    t = TrainSection(processes=2, max_seq_length=128, effective_batch_size=8, micro_batch_size=2)
    one = decide_plan(t.model_copy(update={"processes": 1}), make_probe(ram_gib=24, packages=CPU_ONLY), TINY)
    plan = decide_plan(t, make_probe(ram_gib=24, packages=CPU_ONLY), TINY)
    assert (plan.backend, plan.device, plan.world_size) == ("hf", "cpu", 2)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.effective_batch_size) == (2, 2, 8)
    assert trainer_arguments(t, plan, 7, Path("ckpt"))["ddp_backend"] == "gloo"
    assert trainer_arguments(t, one, 7, Path("ckpt"))["ddp_backend"] is None
    assert any("gloo" in r for r in plan.reasons) and any("slow" in w for w in plan.warnings)
    assert plan.memory.budget_gib == pytest.approx(one.memory.budget_gib / 2, abs=0.01)  # the processes share the RAM


def test_more_processes_than_visible_gpus_is_refused_naming_the_key():
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(processes=3), make_probe(cuda_gib=80, gpus=2, packages=NO_UNSLOTH), SMALL)
    [problem] = err.value.problems
    assert problem.startswith("train.processes=3") and "only 2 CUDA GPU(s)" in problem and "at most 2" in problem


def test_backends_that_train_in_one_process_refuse_several_with_every_other_reason():
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(backend="unsloth", processes=2, packing=True), make_probe(cuda_gib=80, gpus=2), SMALL)
    assert {"train.processes=2:", "train.packing"} <= {p.split(" ")[0] for p in err.value.problems}
    assert any("train.backend: hf" in p for p in err.value.problems if p.startswith("train.processes"))
    with pytest.raises(PlanError, match=r"train.processes=2: the mlx backend trains in one process"):
        decide_plan(TrainSection(processes=2, max_seq_length=256), make_probe(apple=True, ram_gib=64), SMALL)
    with pytest.raises(PlanError, match=r"train.processes=2: data parallel runs on CUDA GPUs .* not on mps"):
        decide_plan(TrainSection(backend="hf", device="mps", processes=2, max_seq_length=256),
                    make_probe(apple=True, ram_gib=64), SMALL)


# -- the launcher, without launching ------------------------------------------------------------------------------

def test_a_process_torchrun_started_trains_in_place(monkeypatch):
    from lorapipe.phases.launch import needs_launch

    plan = decide_plan(TrainSection(processes=2, max_seq_length=128), make_probe(ram_gib=24, packages=CPU_ONLY), TINY)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert needs_launch(plan)
    assert not needs_launch(plan.model_copy(update={"world_size": 1}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not needs_launch(plan)  # a rank: never launch again from inside one


def test_the_ranks_metrics_reach_the_steps_tracker_afterwards(tmp_path):
    from lorapipe.training.monitoring import METRICS_JSONL, replay_to_tracker

    class Recorder:
        def __init__(self):
            self.config, self.rows = None, []

        def log_config(self, config):
            self.config = config

        def log_row(self, row, step):
            self.rows.append((step, row["loss"]))

    (tmp_path / METRICS_JSONL).write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    tracker = Recorder()
    assert replay_to_tracker(tmp_path, tracker, {"seed": 7}) == 2
    assert tracker.config == {"seed": 7} and tracker.rows == [(1, 1.0), (2, 0.5)]


# -- the train step over two CPU processes -------------------------------------------------------------------------

TRAIN_ROWS, EFFECTIVE = 32, 8


@pytest.fixture(scope="module")
def launched(tiny_model_dir, quickstart_records, tmp_path_factory):
    """The pipeline's train step function (no ZenML run) with a plan of two CPU processes."""
    import io
    import sys
    from contextlib import redirect_stdout

    from lorapipe.hardware.plan import decide_plan as decide_run_plan
    from lorapipe.hardware.plan import model_size
    from lorapipe.hardware.probe import probe
    from steps.train import train_adapter

    work = tmp_path_factory.mktemp("ddp")
    train = ConversationDataset(quickstart_records[:TRAIN_ROWS], name="train")
    evals = ConversationDataset(quickstart_records[TRAIN_ROWS:TRAIN_ROWS + 4], name="eval")
    model = ModelSection(name_or_path=str(tiny_model_dir))
    cfg = TrainSection(backend="hf", device="cpu", processes=2, micro_batch_size=2, effective_batch_size=EFFECTIVE,
                       max_seq_length=96, epochs=1, learning_rate=5e-3, warmup_steps=0, logging_steps=1, save_steps=2,
                       save_total_limit=3, output_root=str(work / "runs"), lora={"r": 8, "alpha": 16})
    plan = decide_run_plan(cfg, probe(str(work)), model_size(str(tiny_model_dir))).train
    base_before = load_file(str(tiny_model_dir / "model.safetensors"))

    def run_step() -> tuple[Path, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            folder = train_adapter.entrypoint(train_split=train, eval_split=evals, training_plan=plan, model=model,
                                              train=cfg, seed=7)
        sys.stdout.write(out.getvalue())  # shown when a test fails
        return Path(folder.path), out.getvalue()

    adapter_dir, stdout = run_step()
    return {"adapter_dir": adapter_dir, "stdout": stdout, "plan": plan, "train": train, "cfg": cfg,
            "base_before": base_before, "run_step": run_step}


@pytest.mark.slow
def test_the_train_step_launches_two_ranks_that_train_one_adapter(launched, tiny_model_dir):
    from lorapipe.phases.launch import LAUNCH_DIR
    from lorapipe.phases.train_worker import read_statuses

    adapter_dir, plan = launched["adapter_dir"], launched["plan"]
    launch_dir = adapter_dir.parent / LAUNCH_DIR
    statuses = read_statuses(launch_dir)
    assert sorted(statuses) == [0, 1] and all(s["ok"] and s["world_size"] == 2 for s in statuses.values())
    assert statuses[0]["pid"] != statuses[1]["pid"]
    for rank in (0, 1):  # each rank's output kept apart
        assert "resuming from" not in (launch_dir / "logs" / f"rank{rank}.log").read_text()
    # one adapter: LoRA weights moved from their zero init, the base weights did not
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    base_after = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(launched["base_before"][k], base_after[k]) for k in base_after)
    # the effective batch is one process's: 32 rows / (micro 2 x accumulation 2 x 2 processes) = 4 optimizer steps
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size == EFFECTIVE
    meta = json.loads((adapter_dir / "lorapipe_adapter.json").read_text())
    assert meta["world_size"] == 2 and meta["plan"]["world_size"] == 2 and meta["result"]["world_size"] == 2
    assert meta["result"]["steps"] == TRAIN_ROWS // EFFECTIVE
    # tokens and throughput are the run's, all ranks together: every row's tokens, once
    from lorapipe.models.loading import load_tokenizer
    from lorapipe.tasks.sft import tokenize_dataset

    tokens = sum(len(x) for x in tokenize_dataset(launched["train"], load_tokenizer(str(tiny_model_dir)),
                                                   plan.max_seq_length)["input_ids"])
    result = meta["result"]
    assert result["train_tokens"] == tokens == meta["padding_waste"]["real_tokens"]
    assert result["tokens_per_second"] == pytest.approx(tokens / result["train_seconds"])
    # rank 0 alone wrote the metrics and plots and printed the progress lines, once per step
    rows = assert_monitor_outputs(adapter_dir, [1, 2, 3, 4], 4, launched["stdout"])
    assert all(r["tokens_per_second"] > 0 for r in rows)
    assert launched["stdout"].count("checkpoint saved: step 2") == 1
    assert (adapter_dir.parent / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").exists()


@pytest.mark.slow
def test_a_data_parallel_run_resumes_from_its_checkpoint_to_the_same_adapter(launched):
    """The run crashed after step 2 (its last checkpoint gone, the adapter never finished): the same step resumes on
    two ranks and ends with the LoRA weights of the uninterrupted run."""
    import shutil

    from lorapipe.training.monitoring import read_metrics

    adapter_dir = launched["adapter_dir"]
    uninterrupted = load_file(str(adapter_dir / "adapter_model.safetensors"))
    checkpoints = adapter_dir.parent / "checkpoints"
    shutil.rmtree(checkpoints / "checkpoint-4")
    for name in ("adapter_model.safetensors", "lorapipe_adapter.json"):
        (adapter_dir / name).unlink()
    again, stdout = launched["run_step"]()
    assert again == adapter_dir
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in stdout
    meta = json.loads((adapter_dir / "lorapipe_adapter.json").read_text())
    assert meta["result"]["resumed_from"] == str(checkpoints / "checkpoint-2") and meta["result"]["steps"] == 4
    resumed = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # the metrics continue from the checkpoint: the crashed run's rows after step 2 were replaced, not repeated
    assert [r["step"] for r in read_metrics(adapter_dir)] == [1, 2, 3, 4]
    assert [line for line in stdout.splitlines() if line.startswith("step ")][0].startswith("step 3/4")


@pytest.mark.slow
def test_a_failed_rank_is_named_with_its_exit_code_last_lines_and_log(launched, tmp_path):
    from lorapipe.phases.launch import DataParallelLaunchError, train_data_parallel

    missing = tmp_path / "no-such-model"
    with pytest.raises(DataParallelLaunchError) as err:
        train_data_parallel(ModelSection(name_or_path=str(missing)), launched["cfg"], 7, launched["plan"],
                            launched["train"], launched["train"], tmp_path / "w", tmp_path / "w" / "adapter")
    msg = str(err.value)
    assert "data-parallel training failed: rank " in msg and " of 2 exited with code 1" in msg
    assert str(missing) in msg  # the failed rank's own last lines say what went wrong
    rank_log = Path(msg.split("'s log: ")[1].split(";")[0])
    assert rank_log.exists() and str(missing) in rank_log.read_text()
    assert (tmp_path / "w" / "launch" / "launch.log").exists()


@pytest.mark.parametrize("gpus,effective", [(3, 16), (3, 32), (6, 16), (4, 6), (2, 16), (1, 12)])
def test_the_effective_batch_is_the_one_asked_for_or_a_warning_says_otherwise(gpus, effective):
    from lorapipe.config import TrainSection
    from lorapipe.hardware.plan import decide_plan
    from tests.test_catalog import TINY
    from tests.test_plan import make_probe

    train = TrainSection(max_seq_length=128, backend="hf", effective_batch_size=effective, max_micro_batch_size=8)
    plan = decide_plan(train, make_probe(cuda_gib=24, gpus=gpus), TINY).train
    trained = plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size
    assert trained == plan.effective_batch_size
    if effective % gpus == 0:
        assert trained == effective, plan.reasons
    else:
        assert any(f"train.effective_batch_size={effective} is not a multiple of {gpus}" in w for w in plan.warnings)
