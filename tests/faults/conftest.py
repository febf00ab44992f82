"""Fixtures of the fault suite: the uninterrupted reference training every fault is compared with, and (slow) whole
`lorapipe run`s, killed during merge and during register and then completed, with secrets in their environment."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import QUICKSTART_DATA, REPO_ROOT, Tee
from tests.faults import adapter_sha256, train_here


def train_captured(model_dir, work: Path, **kw):
    out = Tee(sys.stdout)
    with contextlib.redirect_stdout(out):
        info = train_here(model_dir, work, **kw)
    return info, out.getvalue()


@pytest.fixture(scope="session")
def reference(tiny_model_dir, tmp_path_factory):
    """The shared training, uninterrupted, in this process: its checkpoints (4, 6, 8) and its adapter's sha256."""
    work = tmp_path_factory.mktemp("faults-reference")
    info, out = train_captured(tiny_model_dir, work)
    assert info.steps == 8 and info.resumed_from is None
    return SimpleNamespace(info=info, work=work, checkpoints=work / "checkpoints", sha=adapter_sha256(info.path),
                           stdout=out)


def plain(text: str) -> str:
    """Text without the terminal colours ZenML's log lines carry."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# -- whole pipeline runs -----------------------------------------------------------------------------------------

SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
MODEL_NAME = "lorapipe-faults"


def _lorapipe_run(cfg: Path, env: dict, after: tuple[str, ...] = (), sig: int = signal.SIGKILL,
                  module: str = "lorapipe_app.cli"):
    """`lorapipe run -c cfg` in a child process (`module`: the command, or tests.faults.paused_run). With `after`,
    send it `sig` once a line containing all those texts appears. Returns (exit code, output, whether the signal was
    sent)."""
    proc = subprocess.Popen([sys.executable, "-m", module, "run", "-c", str(cfg)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if after and not sent and all(k in line for k in after):
                os.kill(proc.pid, sig)
                sent = True
                if sig == signal.SIGKILL:
                    break
        rest, _ = proc.communicate(timeout=600)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines), sent


@pytest.fixture(scope="session")
def pipeline_runs(tiny_model_dir, tmp_path_factory):
    """Whole `lorapipe run`s on a ZenML store of their own (its home folder is `zen`), with HF_TOKEN,
    HUGGING_FACE_HUB_TOKEN and WANDB_API_KEY set to fresh random strings:

    1. preempted: SIGTERM once the training announces checkpoint 4 (it saves the next step and fails);
    2. run again (training resumes from that checkpoint) and killed (SIGKILL) inside the merge step, once the merged
       weights are in the store and the rest of the folder is not (tests.faults.paused_run stops there);
    3. run again (training and evaluation come from the cache) and killed as the register step starts;
    4. run again to the end;
    5. the same config uninterrupted, on a store and an output folder of its own: what the faulted runs must end with.

    Then `tests.faults.store_probe` reads each store back in a process of its own (the stores are not this
    session's)."""
    from tests.test_pipeline import _config

    tmp = tmp_path_factory.mktemp("faults-pipeline")
    data = tmp / "rows.jsonl"
    data.write_text("".join(QUICKSTART_DATA.read_text().splitlines(keepends=True)[:120]))
    cfg = _config(tmp, tiny_model_dir, data, model_name=MODEL_NAME)
    import yaml

    doc = yaml.safe_load(cfg.read_text())
    doc["train"].update(save_steps=4, save_total_limit=2)  # checkpoints in output_root, grepped for secrets too
    cfg.write_text(yaml.safe_dump(doc))
    zen = tmp / "zen"
    planted = {name: f"{name.lower()}-{secrets.token_hex(16)}" for name in SECRET_NAMES}
    # INFO: the step lines ("Step merge_model has started", "merging into ...") the kills are timed on
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "ZENML_CONFIG_PATH": str(zen),
           "ZENML_LOGGING_VERBOSITY": "INFO", **planted}

    runs = []
    from tests.faults.paused_run import PAUSED

    for after, sig, module in ((("checkpoint saved: step 4",), signal.SIGTERM, "lorapipe_app.cli"),
                               ((PAUSED,), signal.SIGKILL, "tests.faults.paused_run"),
                               (("register_model", "has started"), signal.SIGKILL, "lorapipe_app.cli"),
                               ((), None, "lorapipe_app.cli")):
        code, out, sent = _lorapipe_run(cfg, env, after, sig, module)
        runs.append(SimpleNamespace(code=code, output=out, sent=sent))
        (tmp / f"run{len(runs)}.log").write_text(out)  # to read when a test fails
    reference_cfg = tmp / "reference.yaml"
    reference_cfg.write_text(yaml.safe_dump({**doc, "train": {**doc["train"],
                                                             "output_root": str(tmp / "runs-reference")}}))
    reference_env = {**env, "ZENML_CONFIG_PATH": str(tmp / "zen-reference")}
    code, out, _ = _lorapipe_run(reference_cfg, reference_env, (), None, "lorapipe_app.cli")
    (tmp / "reference.log").write_text(out)
    assert code == 0, out[-3000:]

    def read_store(store_env: dict) -> tuple[dict, str]:
        probe = subprocess.run([sys.executable, "-m", "tests.faults.store_probe", MODEL_NAME], cwd=REPO_ROOT,
                               env=store_env, capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
        return json.loads(probe.stdout.strip().splitlines()[-1]), probe.stdout + probe.stderr

    store, probe_output = read_store(env)
    reference_store, _ = read_store(reference_env)
    return SimpleNamespace(runs=runs, store=store, reference_store=reference_store, zen=zen,
                           output_root=tmp / "runs", secrets=planted, cfg=cfg, probe_output=probe_output)
