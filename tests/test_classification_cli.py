"""task: classification from the command line: `validate --format classification`, the size guide of
`estimate-memory --task classification --guide`, and `backends` saying which backend trains which task."""

import json

from lorapipe_app.cli import main
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "tests" / "data" / "model_configs"


def test_validate_a_csv_of_labelled_rows(tmp_path, capsys):
    path = tmp_path / "tickets.csv"
    path.write_text("body,queue\nrefund please,billing\nlogin fails,tech\nrefund please,tech\n,billing\n")
    assert main(["validate", str(path), "--format", "classification", "--text-key", "body", "--label-key",
                 "queue"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:4: [conflicting_label] queue: the same text as line 2 with another label" in out
    assert f"{path}:5: [empty_text] text: empty or whitespace-only text" in out
    assert "labels (2, inferred): billing 1, tech 1" in out
    assert main(["validate", str(path), "--format", "classification", "--text-key", "body", "--label-key",
                 "queue", "--labels", "billing,tech,sales", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["classification"]["labels"] == ["billing", "tech", "sales"]
    assert any(p["code"] == "empty_class" and "'sales'" in p["message"] for p in report["problems"])


def test_the_size_guide_comes_from_the_memory_model(capsys):
    assert main(["estimate-memory", str(CONFIGS / "bert-base-uncased.json"), "--task", "classification", "--guide",
                 "--guide-model", str(CONFIGS / "llama-3.1-8b.json"), "--seq-len", "128", "--micro-batch-size",
                 "32", "--json"]) == 0
    rows = {(r["model"].rsplit("/", 1)[-1], r["method"]): r for r in json.loads(capsys.readouterr().out)}
    bert_full = rows[("bert-base-uncased.json", "full")]
    assert bert_full["parameters"] == 109_482_240 + 1_538 and bert_full["fits"]["8"] == "yes"
    assert rows[("llama-3.1-8b.json", "full")]["fits"]["80"] == "no"
    assert rows[("llama-3.1-8b.json", "qlora")]["fits"]["24"] in ("yes", "gradient checkpointing")
    assert main(["estimate-memory", str(CONFIGS / "bert-base-uncased.json"), "--task", "classification", "--guide",
                 "--seq-len", "128", "--micro-batch-size", "32"]) == 0
    table = capsys.readouterr().out
    assert "full" in table and "qlora" in table and "80 GiB" in table
    assert main(["estimate-memory", str(CONFIGS / "bert-base-uncased.json"), "--method", "full"]) == 2


def test_backends_say_which_task_each_trains(capsys):
    assert main(["backends", "--json"]) == 0
    rows = {r["backend"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["hf"]["tasks"] == ["sft", "classification", "preference"]
    assert rows["hf"]["methods"] == ["lora", "full", "dpo", "kto", "orpo"]
    assert rows["mlx"]["tasks"] == ["sft", "preference"] and "causal LMs" in rows["mlx"]["limits"]
    assert rows["mlx"]["methods"] == ["lora", "dpo", "orpo"] and "no KTO" in rows["mlx"]["limits"]
    assert rows["unsloth"]["tasks"] == ["sft", "preference"]
