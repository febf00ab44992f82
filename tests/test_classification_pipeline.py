"""task: classification end to end on a real (temporary) ZenML store: the same seven steps train a tiny encoder on the
routing set, evaluate it against the majority class and its head-only baseline on the held-out split, merge it with
its labels, register and promote it by macro F1; `lorapipe predict` prints a label and every label's probability."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lorapipe_app.cli import main
from tests.conftest import CLASSIFICATION_DATA, REPO_ROOT

pytestmark = pytest.mark.slow
LABELS = ["general", "sports", "sql"]  # inferred from the rows, sorted


def _last_run():
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]


def _output(run, step, name):
    return run.steps[step].outputs[name][0]


@pytest.fixture(scope="module")
def runs(tiny_encoder_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    data = tmp / "routing.jsonl"
    shutil.copy(CLASSIFICATION_DATA, data)
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "classification-quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_encoder_dir)
    cfg["data"]["paths"] = [str(data)]
    cfg["train"].update(device="cpu", output_root=str(tmp / "runs"))
    cfg["register"]["model_name"] = "lorapipe-router-test"
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "-c", str(path)]) == 0
    out = {"first": _last_run(), "cfg": path, "tmp": tmp}
    assert main(["run", "-c", str(path)]) == 0
    out["cached"] = _last_run()
    return out


def test_every_step_runs_and_a_rerun_is_served_from_cache(runs):
    statuses = {name: str(s.status).split(".")[-1].lower() for name, s in runs["first"].steps.items()}
    assert set(statuses.values()) == {"completed"}, statuses
    cached = {name: str(s.status).split(".")[-1].lower() for name, s in runs["cached"].steps.items()}
    assert cached["train_adapter"] == cached["evaluate_model"] == cached["merge_model"] == "cached"


def test_the_validation_report_freezes_the_labels_and_the_plan_carries_them(runs):
    report = _output(runs["first"], "validate_data", "validation_report").load()
    assert report.classification.labels == LABELS
    assert report.classification.counts == {"general": 200, "sports": 100, "sql": 150}
    plan = _output(runs["first"], "preflight", "training_plan").load()
    assert (plan.backend, plan.task, plan.method, plan.labels) == ("hf", "classification", "full", LABELS)
    assert any("classification" in r for r in plan.reasons)


def test_the_tuned_classifier_beats_the_majority_class_and_its_head_only_baseline_on_the_test_split(runs):
    metrics = _output(runs["first"], "evaluate_model", "eval_metrics").load()
    c = metrics.classification
    assert set(c.reports) == {"majority", "head_only", "tuned"} and c.untuned == "head_only"
    # the stratified test split holds 20% of each label: 40 general, 20 sports, 30 sql
    assert metrics.test_rows == 90 and c.reports["tuned"]["per_class"]["sports"]["support"] == 20
    majority = c.report("majority")
    # the training majority is "general": 40 of 90 right; F1 of general 2*(40/90)/(40/90 + 1) = 8/13, others 0
    assert majority.accuracy == pytest.approx(40 / 90) and majority.macro_f1 == pytest.approx(8 / 39)
    tuned = c.report("tuned")
    assert tuned.macro_f1 > majority.macro_f1 + 0.3 and tuned.accuracy > majority.accuracy + 0.2
    assert tuned.macro_f1 > c.report("head_only").macro_f1
    assert metrics.tuned.macro_f1 == tuned.macro_f1 and metrics.base.macro_f1 == c.report("head_only").macro_f1
    assert sum(map(sum, tuned.confusion_matrix)) == 90 and tuned.ece is not None
    print(f"\nclassification figures: tuned acc {tuned.accuracy:.3f} macro-F1 {tuned.macro_f1:.3f}; head-only "
          f"{c.report('head_only').accuracy:.3f}/{c.report('head_only').macro_f1:.3f}; majority "
          f"{majority.accuracy:.3f}/{majority.macro_f1:.3f}")


def test_the_evaluation_view_shows_the_report_and_the_confusion_matrix(runs):
    art = _output(runs["first"], "evaluate_model", "eval_metrics")
    uris = [v.uri for v in art.visualizations]
    assert any(u.endswith("confusion_matrix.png") for u in uris)
    html = Path(next(u for u in uris if u.endswith(".html"))).read_text()
    assert "macro" in html and "head_only" in html and "majority" in html and "<img" in html
    assert art.run_metadata["tuned_macro_f1"] > art.run_metadata["untuned_macro_f1"]


def test_the_merged_model_loads_as_a_classifier_with_its_labels(runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = _output(runs["first"], "merge_model", "merged_model").load()
    check = merged.metadata["check"]
    assert check["passed"] and check["greedy_agreement"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(merged.path)
    assert model.config.id2label == dict(enumerate(LABELS))
    tok = AutoTokenizer.from_pretrained(merged.path)
    assert model(**tok(["How many points did the Eagles score?"], return_tensors="pt")).logits.shape == (1, 3)
    assert not (Path(merged.path) / "Modelfile").exists()  # Ollama serves generation, not classifiers
    card = (Path(merged.path) / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    assert "AutoModelForCausalLM" not in card and "| 2 | sql | 105 |" in card


def test_promotion_is_by_macro_f1_over_both_baselines(runs):
    from zenml.client import Client

    mv = Client().get_model_version("lorapipe-router-test", runs["first"].model_version.name)
    assert str(mv.stage).split(".")[-1].lower() == "staging"
    decision = mv.run_metadata["stage_decision"]
    assert decision.startswith("tuned macro_f1") and "the majority class" in decision and "head-only" in decision
    metrics = mv.run_metadata["metrics"]
    assert metrics["tuned_macro_f1"] > metrics["majority_macro_f1"] and metrics["untuned_baseline"] == "head_only"
    assert "tuned_perplexity" not in metrics  # a classifier's loss is a cross-entropy, not a perplexity


def test_lineage_shows_the_classifier_against_its_baselines(runs, capsys):
    version = runs["first"].model_version.name
    assert main(["lineage", f"lorapipe-router-test:{version}"]) == 0
    out = capsys.readouterr().out
    assert "macro F1 majority 0.205, untuned 0.205 -> tuned" in out and "perplexity" not in out.split("└─")[0]


def test_predict_prints_a_label_and_every_probability(runs, capsys):
    assert main(["predict", "lorapipe-router-test:staging", "Who won Super Bowl LIX?", "-p",
                 "How many rows have a population over 1000?", "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["text"] for a in answers] == ["Who won Super Bowl LIX?", "How many rows have a population over 1000?"]
    for a in answers:
        assert set(a["probabilities"]) == set(LABELS) and sum(a["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert a["label"] == max(a["probabilities"], key=a["probabilities"].get)
    assert main(["predict", "lorapipe-router-test:staging", "Who won Super Bowl LIX?"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "> Who won Super Bowl LIX?" and out[1].split()[0] in LABELS and "(" in out[1]


def test_a_stage_holder_of_another_task_is_not_replaced():
    """One register.model_name used by an SFT and a classification config: the holder cannot be scored as the other
    kind of model, and it keeps its stage, with the fix in the reason."""
    from lorapipe.evaluation.metrics import EvalMetrics, ModelScores
    from lorapipe.registry import StageHolderScores, decide_stage

    scores = ModelScores(loss=0.1, perplexity=1.1, accuracy=0.9, macro_f1=0.9)
    metrics = EvalMetrics(test_rows=1, scored_rows=1, generated_rows=0, scored_tokens=1, base=scores, tuned=scores,
                          perplexity_gain=0.0, tuned_beats_base=True, samples=[])
    holder = StageHolderScores(stage="staging", version="abc", comparable=False,
                               note="version abc holds staging of register.model_name m and is a sft model, this one "
                                    "a classification model: they cannot be compared; give this task its own "
                                    "register.model_name")
    stage, reason = decide_stage(metrics, True, "staging", 0.0, "macro_f1", holder=holder)
    assert stage is None and "give this task its own register.model_name" in reason
