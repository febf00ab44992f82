"""task: preference end to end on a real (temporary) ZenML store: an SFT version is registered, then DPO starts
from it by name (`model.name_or_path: MODEL:STAGE`), trains, evaluates the SFT model against the tuned one on
held-out pairs, merges and registers; the new version's lineage names the SFT version it started from."""

import json

import pytest
import yaml

from lorapipe_app.cli import main
from tests.conftest import REPO_ROOT
from tests.test_pipeline import _config
from tests.test_preference_train import learnable_pairs

pytestmark = pytest.mark.slow


def _last_run():
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, quickstart_records):
    tmp = tmp_path_factory.mktemp("preference")
    from tests.conftest import QUICKSTART_DATA

    sft_cfg = _config(tmp, tiny_model_dir, QUICKSTART_DATA, model_name="pref-sft")
    assert main(["run", "-c", str(sft_cfg)]) == 0
    out = {"sft": _last_run()}
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r.messages[0]["content"], "chosen": r.chosen[0]["content"],
                                         "rejected": r.rejected[0]["content"]}) + "\n" for r in learnable_pairs()))
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "dpo-quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = "pref-sft:staging"
    cfg["data"]["paths"] = [str(pairs)]
    cfg["validation"].update(on_bad_rows="fail", max_bad_fraction=0.0)
    cfg["split"]["test_fraction"] = 0.2
    cfg["train"].update(device="cpu", max_seq_length=96, epochs=2, learning_rate=5e-3, micro_batch_size=4,
                        effective_batch_size=8, output_root=str(tmp / "runs"))
    cfg["register"]["model_name"] = "pref-dpo"
    path = tmp / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out["cfg"] = path
    assert main(["run", "-c", str(path)]) == 0
    out["dpo"] = _last_run()
    return out


def test_dpo_starts_from_the_registered_sft_version_and_records_it(runs, capsys):
    from zenml.client import Client

    sft_version = runs["sft"].model_version
    assert Client().get_model_version("pref-sft", sft_version.name).stage == "staging"
    run = runs["dpo"]
    status = {name: str(step.status).split(".")[-1].lower() for name, step in run.steps.items()}
    assert set(status.values()) == {"completed"} and "evaluate_base_model" not in status
    meta = Client().get_model_version("pref-dpo", run.model_version.name).run_metadata
    assert meta["base_model"]["registered_version"] == f"pref-sft:{sft_version.name} (asked as pref-sft:staging)"
    sft_merged = runs["sft"].steps["merge_model"].outputs["merged_model"][0].load().path
    assert meta["base_model"]["name_or_path"] == str(sft_merged)
    assert main(["lineage", f"pref-dpo:{run.model_version.name}"]) == 0
    assert f"registered version pref-sft:{sft_version.name}" in capsys.readouterr().out


def test_the_tuned_model_beats_the_sft_model_on_held_out_pairs_and_is_promoted(runs):
    metrics = runs["dpo"].steps["evaluate_model"].outputs["eval_metrics"][0].load()
    assert metrics.tuned.preference_accuracy > metrics.base.preference_accuracy
    assert metrics.tuned.reward_margin > 0 and metrics.scored_rows >= 10
    from zenml.client import Client

    mv = Client().get_model_version("pref-dpo", runs["dpo"].model_version.name)
    assert mv.stage == "staging" and "preference_accuracy" in mv.run_metadata["stage_decision"]
    merged = runs["dpo"].steps["merge_model"].outputs["merged_model"][0].load()
    assert merged.metadata["check"]["passed"]


def test_a_registered_version_that_does_not_exist_is_said_in_one_line(runs, capsys):
    assert main(["run", "-c", str(runs["cfg"]), "--set", "model.name_or_path=pref-sft:production"]) != 0
    err = capsys.readouterr().err
    assert "pref-sft:production names no registered model version" in err and "Traceback" not in err


def test_dpo_on_unpaired_feedback_is_refused_at_preflight_with_the_fix(runs, capsys):
    from tests.test_preference_data import KTO_SLICE

    code = main(["run", "-c", str(runs["cfg"]), "--set", f"data.paths=[{KTO_SLICE}]",
                 "--set", "validation.min_rows=10", "--set", "train.max_seq_length=2048",
                 "--set", "validation.on_bad_rows=quarantine", "--set", "validation.max_bad_fraction=1.0"])
    err = capsys.readouterr().err
    assert code != 0 and "unpaired feedback (20 desirable, 20 undesirable answers): set train.method: kto" in err
    assert "Traceback" not in err
