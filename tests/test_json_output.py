"""Every `--json` output is JSON alone on stdout, on the first use of a new ZenML store too: ZenML's store-creation
lines ("Initializing the ZenML global configuration ...", printed at its default verbosity) and any library notice
go to stderr, and no deprecation line reaches the user. Each command runs as a user runs it: the `lorapipe`
console command in a fresh process, each store-opening command on a store of its own that does not exist yet."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import QUICKSTART_DATA, REPO_ROOT
from tests.test_pipeline import _config


def _fresh_store_env(folder):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZENML_")}
    # the user's defaults: INFO verbosity (the test session runs ZenML at WARN), no analytics from a test
    return {**env, "ZENML_CONFIG_PATH": str(folder / "zenml"), "ZENML_ANALYTICS_OPT_IN": "false",
            "PYTHONPATH": str(REPO_ROOT)}


@pytest.mark.slow
def test_every_json_output_parses_on_a_new_store(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, QUICKSTART_DATA)
    commands = {
        "backends": ["backends", "--json"],
        "estimate-memory": ["estimate-memory", str(tiny_model_dir), "--device", "cpu", "--seq-len", "128", "--json"],
        "validate": ["validate", str(QUICKSTART_DATA), "--json"],
        "preflight": ["preflight", "-c", str(cfg), "--json", "--out", str(tmp_path / "preflight")],
        "runs": ["runs", "--json"],
        "schedule list": ["schedule", "list", "--json"],
        "lineage --dataset": ["lineage", "--dataset", str(QUICKSTART_DATA), "--json"],
        "predict": ["predict", str(tiny_model_dir), "--prompt", "What is new?", "--max-new-tokens", "4", "--json"],
    }
    cli = [sys.executable, "-c", "from lorapipe_app.cli import entry; entry()"]
    started = {}
    for i, (name, args) in enumerate(commands.items()):
        store = tmp_path / f"store-{i}"
        started[name] = subprocess.Popen([*cli, *args], cwd=tmp_path, env=_fresh_store_env(store),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parsed_by_name = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=600)
        # lineage --dataset exits 1 when no version was trained on the file (as grep does), its JSON said so
        expected = 1 if name == "lineage --dataset" else 0
        assert proc.returncode == expected, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
        try:
            if name == "predict":  # one JSON object per answer
                parsed = [json.loads(line) for line in out.splitlines()]
            else:
                parsed = json.loads(out)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{name}: stdout is not JSON alone ({exc}):\n{out[:600]}") from None
        parsed_by_name[name] = parsed
        assert "deprecated" not in (out + err).lower(), f"{name}: a deprecation line reached the user\n{err[-800:]}"
        if name in ("preflight", "runs", "schedule list", "lineage --dataset"):
            # the store was new: ZenML said so, on stderr
            assert "Initializing the ZenML global configuration" in err, f"{name}: {err[-800:]}"
    # and the JSON says what the command found: nothing yet in a new store, an answer from the model
    assert parsed_by_name["runs"] == [] and parsed_by_name["lineage --dataset"]["model_versions"] == []
    assert parsed_by_name["preflight"]["report"] and "train" in parsed_by_name["preflight"]["recommended_config"]
    assert [set(a) >= {"prompt", "completion"} for a in parsed_by_name["predict"]] == [True]
