"""Two runs against the same local store at once (issue 11, item 6): two `lorapipe run`s started together on this test
session's SQLite store (ZENML_CONFIG_PATH, set in tests/conftest.py), on different data and model names so both
train. Both complete, both model versions are registered, the store lists both runs with every step completed, and
the SQLite file passes `PRAGMA integrity_check`.

A store used for the very first time by two processes at once: ZenML 0.98 creates a fresh SQLite store's tables
without a lock (alone, one of the two stops with `table project already exists` or "never been migrated with
alembic"); lorapipe creates the store under a file lock first (`lorapipe_app.api.ensure_store`), so both run.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.faults import QUICKSTART_DATA, REPO_ROOT, child_env

pytestmark = pytest.mark.slow

RUN_LINE = re.compile(r"lorapipe run (\S+): (\S+) in .*\nmodel\s+(\S+) version (\S+), stage: (\S+)")


def _config(tmp: Path, tiny_model_dir: Path, name: str, rows: slice) -> Path:
    from tests.test_pipeline import _config as pipeline_config

    folder = tmp / name
    folder.mkdir()
    data = folder / "rows.jsonl"
    data.write_text("".join(QUICKSTART_DATA.read_text().splitlines(keepends=True)[rows]))
    cfg = pipeline_config(folder, tiny_model_dir, data, model_name=name)
    doc = yaml.safe_load(cfg.read_text())
    doc["train"].update(max_steps=4, save_steps=2)
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def _store_file() -> Path:
    from zenml.client import Client

    url = Client().zen_store.url
    assert url.startswith("sqlite:///"), url
    return Path(url[len("sqlite:///"):])


@pytest.mark.slow
def test_two_runs_at_once_on_one_sqlite_store_both_complete_and_register(tiny_model_dir, tmp_path):
    from zenml.client import Client

    Client().active_stack  # noqa: B018 - reading it creates the store; the store exists and has its default stack, as on a machine that ran lorapipe before
    names = ("lorapipe-concurrent-a", "lorapipe-concurrent-b")
    cfgs = [_config(tmp_path, tiny_model_dir, names[0], slice(0, 100)),
            _config(tmp_path, tiny_model_dir, names[1], slice(100, 200))]
    # output to files, not pipes: a pipe nobody reads while the other run is waited for would stall its writer
    logs = [tmp_path / f"run-{name}.log" for name in names]
    procs = []
    try:
        for cfg, log in zip(cfgs, logs):
            with open(log, "w") as fh:
                procs.append(subprocess.Popen([sys.executable, "-m", "lorapipe_app.cli", "run", "-c", str(cfg)],
                                              cwd=REPO_ROOT, env=child_env(), stdout=fh, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=480)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [log.read_text() for log in logs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]

    found = [RUN_LINE.search(out) for out in outputs]
    assert all(found), [out[-2000:] for out in outputs]
    assert [f.group(3) for f in found] == list(names)
    assert all(f.group(2) == "completed" for f in found)

    client = Client()
    for f in found:
        run_name, name, version = f.group(1), f.group(3), f.group(4)
        mv = client.get_model_version(name, version)  # registered: the version the run printed
        assert mv.run_metadata.get("config_sha256"), f"{name} {version} carries no registration metadata"
        assert [v.name for v in client.list_model_versions(model=name).items] == [version]
        run = client.get_pipeline_run(run_name)
        assert str(run.status).endswith("completed")
        assert run.steps["train_adapter"].outputs["adapter"], run_name
        assert all(str(s.status).endswith("completed") for s in run.steps.values()), \
            {n: str(s.status) for n, s in run.steps.items()}
        assert run.model_version is not None and run.model_version.name == version
    # they ran at the same time: each started before the other ended
    runs = [client.get_pipeline_run(f.group(1)) for f in found]
    assert max(r.start_time for r in runs) < min(r.end_time for r in runs), [(r.start_time, r.end_time) for r in runs]
    # every run the store lists (this session's others too) reads back
    assert {f.group(1) for f in found} <= {r.name for r in client.list_pipeline_runs(size=100).items}

    with sqlite3.connect(_store_file()) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# -- a store used for the first time by two processes at once --------------------------------------------------------

@pytest.fixture(scope="module")
def first_use_race(tmp_path_factory):
    """Two `lorapipe runs` started together on a ZenML home that does not exist yet (each creates the SQLite store
    on first use), then a third one after both ended. Returns (the pair's (exit code, output)s, the third's, store)."""
    zen = tmp_path_factory.mktemp("fresh-zen") / "home"
    env = child_env(ZENML_CONFIG_PATH=str(zen))
    cmd = [sys.executable, "-m", "lorapipe_app.cli", "runs"]
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    pair = [(p.returncode, out) for p, out in zip(procs, outputs)]
    third = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    db_file = zen / "local_stores" / "default_zen_store" / "zenml.db"
    return pair, (third.returncode, third.stdout + third.stderr), db_file


def test_two_first_uses_of_a_fresh_store_at_once_leave_it_intact(first_use_race):
    pair, (code, out), db_file = first_use_race
    assert all(c == 0 for c, _ in pair), [o[-2000:] for _, o in pair]  # one created the store, the other waited
    with sqlite3.connect(db_file) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT version_num FROM alembic_version").fetchall(), "the store was never migrated"
    assert code == 0 and "no lorapipe run in this ZenML store yet" in out, out[-2000:]  # and it works afterwards


def test_two_first_uses_of_a_fresh_store_at_once_both_succeed(first_use_race):
    pair, _, _ = first_use_race
    assert [c for c, _ in pair] == [0, 0], [o[-1500:] for _, o in pair]
