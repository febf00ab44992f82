"""The command line as a user meets it: help with an example on every command, usage errors exit 2, mistakes exit 1
with one paragraph and no traceback unless --debug asks for it; data sources resolved when a run starts; `watch`
following a training from its files."""

import json
import threading
import time

import pytest

from lorapipe_app.cli import cli, main
from tests.conftest import QUICKSTART_DATA, REPO_ROOT


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,)
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))


@pytest.mark.parametrize("command", list(_commands(cli)), ids=" ".join)
def test_every_command_has_help_with_an_example(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: lorapipe") and "Example" in out, out


def test_the_issue_names_every_command():
    names = set(cli.commands)
    assert {"run", "validate", "preflight", "estimate-memory", "predict", "schedule", "lineage", "runs",
            "build-tiny-model", "watch"} <= names


def test_a_usage_error_exits_2_and_a_mistake_exits_1_without_a_traceback(capsys, tmp_path):
    assert main(["run"]) == 2
    assert "Missing option '-c'" in capsys.readouterr().err
    assert main(["run", "-c", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "config file not found" in err and "Traceback" not in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    assert main(["--debug", "run", "-c", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "config file not found" in err


def test_preflight_and_estimate_memory_plan_without_zenml(tiny_model_dir, tmp_path, capsys):
    import yaml

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    cfg["data"]["paths"] = [str(QUICKSTART_DATA)]
    cfg["train"].update(backend="hf", device="cpu")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["preflight", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train:    hf on cpu in float32" in out and "memory:" in out
    assert "ok   model config: llama" in out and "preflight: " in out and "0 failed" in out
    assert main(["preflight", "-c", str(path), "--json", "--out", str(tmp_path / "pf")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["passed"] and {c["section"] for c in printed["report"]["checks"]} >= {
        "python", "packages", "hardware", "disk", "model", "data", "plan", "memory"}
    # the two files of the seed "safe train" script; the recommendation is a valid config fragment
    written = json.loads((tmp_path / "pf" / "preflight_report.json").read_text())
    assert all({"status", "measured", "requirement"} <= set(c) for c in written["checks"])
    recommended = json.loads((tmp_path / "pf" / "recommended_config.json").read_text())
    from lorapipe.config import validate_config

    merged = validate_config({**cfg, "train": {**cfg["train"], **recommended["train"]},
                              "evaluate": {**cfg.get("evaluate", {}), **recommended["evaluate"]}})
    assert merged.train.micro_batch_size == recommended["train"]["micro_batch_size"]
    assert main(["estimate-memory", "-c", str(path), "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)
    assert memory["train_peak_bytes"] == sum(t["bytes"] for t in memory["terms"]["train"].values())
    # a plan that cannot run: every failed check, exit 1
    assert main(["preflight", "-c", str(path), "--set", "train.backend=mlx", "--set", "train.processes=2"]) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "train.processes=2" in err and "Traceback" not in err
    # over the memory budget: refused before any training, naming the knob and a value that fits
    assert main(["preflight", "-c", str(path), "--set", "train.max_seq_length=4000000"]) == 1
    err = capsys.readouterr().err
    assert "training needs about" in err and "train.max_seq_length 4000000 needs" in err and "fits at" in err


# ------------------------------------------------------------------------------------------------ data sources

def test_globs_expand_sorted_and_name_what_matches_nothing(tmp_path):
    from lorapipe.config import DataSection
    from lorapipe.data.formats import file_fingerprint
    from lorapipe.data.sources import DataSourceError
    from steps.data_source import resolve_data

    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_bytes(QUICKSTART_DATA.read_bytes())
    resolved = resolve_data(DataSection(paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]))
    assert resolved.files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]  # sorted, each once
    assert resolved.sha256 == file_fingerprint(resolved.files)
    with pytest.raises(DataSourceError, match=r"the pattern .*\*\.json matches no file"):
        resolve_data(DataSection(paths=[str(tmp_path / "*.json"), str(tmp_path / "missing.jsonl")]))
    with pytest.raises(DataSourceError) as both:
        resolve_data(DataSection(paths=[str(tmp_path / "*.json"), str(tmp_path / "missing.jsonl")]))
    assert len(both.value.problems) == 2  # every problem, not the first


def test_a_named_artifact_is_read_at_its_latest_version(tmp_path):
    from zenml import save_artifact

    from lorapipe.config import DataSection
    from lorapipe.data.sources import DataSourceError
    from steps.data_source import resolve_data

    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:20]]
    save_artifact(rows[:10], name="support-chats")
    first = resolve_data(DataSection(artifact="support-chats"), tmp_path)
    save_artifact(rows, name="support-chats")  # a new drop
    newest = resolve_data(DataSection(artifact="support-chats"), tmp_path)
    assert newest.sha256 != first.sha256 and newest.source.startswith("artifact support-chats version ")
    lines = open(newest.files[0], encoding="utf-8").read().splitlines()
    assert [json.loads(line) for line in lines] == rows  # a file validation can name lines in
    save_artifact(42, name="not-rows")
    with pytest.raises(DataSourceError, match="holds a int"):
        resolve_data(DataSection(artifact="not-rows"), tmp_path)
    with pytest.raises(DataSourceError, match="no artifact named nowhere"):
        resolve_data(DataSection(artifact="nowhere"), tmp_path)


def test_the_config_takes_exactly_one_data_source():
    from lorapipe.config import ConfigError, validate_config

    base = {"model": {"name_or_path": "x"}}
    with pytest.raises(ConfigError, match="exactly one source"):
        validate_config({**base, "data": {"paths": ["a.jsonl"], "artifact": "chats"}})
    with pytest.raises(ConfigError, match="exactly one source"):
        validate_config({**base, "data": {}})
    assert validate_config({**base, "data": {"artifact": "chats"}}).data.artifact == "chats"


# ------------------------------------------------------------------------------------------------------- watch

def _training(tmp_path, steps_done, max_steps=10):
    from lorapipe.training.monitoring import TrainingMonitor

    adapter = tmp_path / "run" / "adapter"
    monitor = TrainingMonitor(adapter, lambda: 0.5, tracker=None, plots=False)
    monitor.begin(0, max_steps)
    for step in range(1, steps_done + 1):
        monitor.log(step, loss=2.0 / step, learning_rate=1e-4, tokens_seen=100.0 * step)
    return monitor, adapter


def test_watch_prints_progress_eta_checkpoint_and_the_end(tmp_path, capsys):
    monitor, adapter = _training(tmp_path, 4)
    (adapter.parent / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    assert main(["watch", str(adapter.parent), "--no-follow"]) == 0
    out = capsys.readouterr().out
    assert "step 4/10 loss 0.50" in out and "eta" in out
    assert "last checkpoint: step 4" in out and "training running after 4 steps" in out
    monitor.end()
    assert main(["watch", str(adapter), "--no-follow"]) == 0
    assert "training finished after 4 steps" in capsys.readouterr().out


def test_watch_follows_until_training_ends(tmp_path):
    import io

    from lorapipe_app.watch import watch

    monitor, adapter = _training(tmp_path, 2)

    def train_on():
        for step in range(3, 11):
            time.sleep(0.05)
            monitor.log(step, loss=1.0, learning_rate=1e-4, tokens_seen=100.0 * step)
        monitor.end()

    worker = threading.Thread(target=train_on)
    worker.start()
    out = io.StringIO()
    assert watch(adapter, follow=True, interval=0.05, stream=out) == "finished"
    worker.join()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/10" for s in range(1, 11)]  # every row once, in order


def test_watch_says_when_training_failed_and_when_there_is_nothing(tmp_path, capsys):
    from lorapipe.training.monitoring import mark_failed

    _, adapter = _training(tmp_path, 3)
    mark_failed(adapter)
    assert main(["watch", str(adapter), "--no-follow"]) == 1
    assert "training failed after 3 steps" in capsys.readouterr().out
    assert main(["watch", "--output-root", str(tmp_path / "empty")]) == 1
    assert "no training has written metrics" in capsys.readouterr().err


def test_watch_knows_a_killed_training_and_reads_past_a_half_written_row(tmp_path, capsys):
    import subprocess
    import sys

    from lorapipe.training.monitoring import PROGRESS_JSON

    _, adapter = _training(tmp_path, 2)
    with open(adapter / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # the writer is mid-line
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    progress = json.loads((adapter / PROGRESS_JSON).read_text())
    progress["pid"] = int(gone.stdout)  # a process that has exited: killed, as far as watch can tell
    (adapter / PROGRESS_JSON).write_text(json.dumps(progress))
    assert main(["watch", str(adapter)]) == 1  # following, yet it ends
    out = capsys.readouterr().out
    assert "step 2/10" in out and "step 3" not in out and "training stopped after 2 steps" in out


def test_an_artifact_of_jsonl_text_is_read_and_written_again_where_a_step_runs_elsewhere(tmp_path):
    from zenml import save_artifact

    from lorapipe.config import DataSection
    from steps.data_source import local_files, resolve_data

    text = QUICKSTART_DATA.read_text()  # the configs/stacks/README.md recipe: save_artifact(open(...).read())
    save_artifact(text, name="chats-as-text")
    data = DataSection(artifact="chats-as-text")
    resolved = resolve_data(data, tmp_path / "resolve-pod")
    assert open(resolved.files[0], encoding="utf-8").read() == text and resolved.artifact_version_id
    # the validate step in another container: the file is not there, the same artifact version writes it again
    elsewhere = local_files(resolved.model_copy(update={"files": ["/nonexistent/pod/rows.jsonl"]}), data,
                            tmp_path / "validate-pod")
    assert open(elsewhere[0], encoding="utf-8").read() == text and str(tmp_path / "validate-pod") in elsewhere[0]


def test_a_schedule_may_wait_for_a_pattern_but_never_for_a_fixed_path(tmp_path):
    from lorapipe.data.sources import expand_paths

    (tmp_path / "seed.jsonl").write_text("{}\n")
    files, problems = expand_paths([str(tmp_path / "seed.jsonl"), str(tmp_path / "drops" / "*.jsonl")],
                                   patterns_may_be_empty=True)
    assert files == [str(tmp_path / "seed.jsonl")] and problems == []
    _, problems = expand_paths([str(tmp_path / "*.jsonl"), str(tmp_path / "missing.jsonl")],
                               patterns_may_be_empty=True)
    assert len(problems) == 1 and "missing.jsonl not found" in problems[0]
