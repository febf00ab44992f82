"""A process that runs one lorapipe command and ends (lorapipe.short_lived): it freezes the training libraries'
objects only once a phase starts and only when it said it is short-lived, and it ends without the interpreter's
teardown yet with every exit handler run, all its output written and its exit code kept."""

import gc
import json
import subprocess
import sys

import pytest

from lorapipe import short_lived
from tests.conftest import REPO_ROOT

# a library's exit handler (registered after lorapipe's, as every library's is), a large write still in stdout's
# buffer, and an exit code of its own
CHILD = """
import atexit, sys
from lorapipe import short_lived
atexit.register(lambda: open(sys.argv[1], "w").write("flushed by the library"))
short_lived.begin()
sys.stdout.write("x" * 200_000)
short_lived.end(3)
"""


def test_a_short_lived_process_runs_every_exit_handler_writes_all_its_output_and_keeps_its_code(tmp_path):
    marker = tmp_path / "handler-ran"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(marker)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stdout) == 200_000 and proc.stderr == ""
    assert marker.read_text() == "flushed by the library"


@pytest.mark.slow  # three `lorapipe` processes
def test_the_lorapipe_command_keeps_its_exit_codes_and_its_json(tmp_path):
    cli = [sys.executable, "-m", "lorapipe_app.cli"]
    listed = subprocess.run([*cli, "backends", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert {row["backend"] for row in json.loads(listed.stdout)} >= {"hf", "unsloth", "mlx"}
    usage = subprocess.run([*cli, "run"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "Missing option '-c'" in usage.stderr
    mistake = subprocess.run([*cli, "run", "-c", str(tmp_path / "missing.yaml")], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
    assert mistake.returncode == 1 and "config file not found" in mistake.stderr
    assert "Traceback" not in mistake.stderr


def test_only_a_process_that_said_it_is_short_lived_freezes(monkeypatch):
    kept = [[i] for i in range(1000)]  # objects this session has not frozen yet (conftest froze the imports)
    gc.collect()
    before = gc.get_freeze_count()
    short_lived.freeze_training_imports()
    assert gc.get_freeze_count() == before  # a test session, a notebook: the collector as it was
    monkeypatch.setattr(short_lived, "_began", True)
    monkeypatch.setattr(short_lived, "_frozen", False)
    try:
        short_lived.freeze_training_imports()
        assert gc.get_freeze_count() >= before + len(kept)
        # a later phase of the same run freezes nothing more: what the first phase left can still be collected
        once = gc.get_freeze_count()
        left_by_the_first_phase = [[i] for i in range(1000)]
        short_lived.freeze_training_imports()
        # (frozen objects freed meanwhile only lower the count; a second freeze would add the 1000 lists)
        assert gc.get_freeze_count() <= once and len(left_by_the_first_phase) == 1000
    finally:
        gc.unfreeze()
        from lorapipe.short_lived import import_and_freeze

        import_and_freeze()  # the session's frozen imports, as conftest left them
