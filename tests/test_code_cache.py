"""The cache sees the code: an edit to the library re-runs the steps that run it, and only those; checkpoints of
older code are set aside, never resumed silently.

The pipeline runs here in child processes on a copy of the repository (lorapipe/, steps/, pipelines/,
materializers/), so the edit is a real edit of real files, as after a `git pull`; the store is this test session's.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe.code_version import dependency_files
from tests.conftest import QUICKSTART_DATA, REPO_ROOT
from tests.test_pipeline import _config, _last_run, _status

CODE = ("lorapipe", "lorapipe_app", "steps", "pipelines", "materializers")
# lines users read as failures (torchao's optional kernels, torch's pytree notes, bitsandbytes' optional CPU kernel,
# Great Expectations registering its API, datasets' bookkeeping bars) and any traceback
NOISE = ("Traceback", "Failed to load", "_pytree", "gemm_4bit", "Skipping registering", "Truncating train dataset",
         "Dropping fully masked")


def test_each_step_depends_on_the_library_files_it_runs():
    train = set(dependency_files("steps/train.py"))
    assert {"lorapipe/backends/hf.py", "lorapipe/backends/trainer.py", "lorapipe/backends/mlx.py",
            "lorapipe/training/monitoring.py", "lorapipe/data/render.py"} <= train
    for before_training in ("steps/validate.py", "steps/split.py"):
        assert "lorapipe/backends/hf.py" not in dependency_files(before_training), before_training
    # preflight's probe (preflight.probe) runs the backends, so an edit there plans again; the steps after it are
    # keyed on the plans' content, so an unchanged plan keeps training cached
    assert "lorapipe/phases/measure.py" in dependency_files("steps/preflight.py")
    assert "lorapipe/data/split.py" in dependency_files("steps/split.py")
    assert "lorapipe/data/split.py" not in train  # the train step gets the splits, not the splitting code
    assert "lorapipe/phases/merge.py" in dependency_files("steps/merge.py")
    assert "lorapipe/phases/evaluate.py" in dependency_files("steps/evaluate.py")
    # a backend's checkpoints are keyed on its own code: an mlx edit does not set hf checkpoints aside
    assert "lorapipe/backends/mlx.py" not in dependency_files("lorapipe.backends.hf")


def test_checkpoints_are_keyed_on_the_task_code_as_well_as_the_backend(tmp_path, monkeypatch):
    """The hf loop picks its task by name at run time, so the backend's imports do not reach the task's module: an
    edit to the SFT task must still set SFT checkpoints aside, and leave classification's alone."""
    from lorapipe import code_version as cv
    from lorapipe.training.checkpoints import training_code_version

    assert "lorapipe/tasks/sft.py" not in dependency_files("lorapipe.backends.hf")
    before = {task: training_code_version("hf", task) for task in ("sft", "classification")}
    # the same sources with tasks/sft.py edited, as after a pull
    copy = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "lorapipe", copy / "lorapipe", ignore=shutil.ignore_patterns("__pycache__"))
    sft = copy / "lorapipe" / "tasks" / "sft.py"
    sft.write_text(sft.read_text() + "\n# edited\n")
    monkeypatch.setattr(cv, "SOURCE_ROOT", copy)
    cv._closure.cache_clear()
    cv.imported_modules.cache_clear()
    try:
        after = {task: training_code_version("hf", task) for task in ("sft", "classification")}
    finally:
        cv._closure.cache_clear()
        cv.imported_modules.cache_clear()
    assert after["sft"] != before["sft"]
    assert after["classification"] == before["classification"]


def _run(repo: Path, cfg: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "lorapipe_app.cli", "run", "-c", str(cfg)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_library_edit_reruns_training_and_what_follows(tiny_model_dir, tmp_path):
    repo = tmp_path / "repo"
    for name in CODE:
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    # data of its own: content-keyed steps must not share cache entries with the other pipeline tests' runs
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(QUICKSTART_DATA.read_text().splitlines(keepends=True)[:200]))
    cfg = _config(tmp_path, tiny_model_dir, data, model_name="lorapipe-code-edit")

    first = _run(repo, cfg)
    # what `lorapipe run` prints is lorapipe's and ZenML's lines, not the libraries' import noise
    for noise in NOISE:
        assert noise not in first, noise
    _run(repo, cfg)
    status = _status(_last_run())
    for never_cached in ("resolve_data_source", "find_stage_holder", "register_model"):
        assert status.pop(never_cached) == "completed", never_cached
    # the first run took the stage ("no version held it" -> "this version holds it"): the holder changed, so its
    # scoring ran again, and scored nothing
    holder = _last_run().steps["score_stage_holder"].outputs["stage_holder_scores"][0].load()
    assert status.pop("score_stage_holder") == "completed" and "already holds" in holder.note, holder
    assert holder.scores is None
    assert set(status.values()) == {"cached"}, status  # unchanged code: fully cached

    library = repo / "lorapipe" / "backends" / "trainer.py"  # used by training, not by validate/preflight/split
    library.write_text(library.read_text() + "\n# a change to the training code, as a git pull brings\n")
    out = _run(repo, cfg)
    status = _status(_last_run())
    assert {s: status[s] for s in ("validate_data", "preflight", "split_data")} == dict.fromkeys(
        ("validate_data", "preflight", "split_data"), "cached"), status
    assert {s: status[s] for s in ("train_adapter", "evaluate_model", "merge_model")} == dict.fromkeys(
        ("train_adapter", "evaluate_model", "merge_model"), "completed"), status
    # the finished training of the older code is set aside, named, and not resumed
    assert "set aside:" in out and "train.resume_from=" in out and "resuming from" not in out
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and folders[0].split("-")[0] == folders[1].split("-")[0], folders
