"""End to end on a real (temporary) ZenML store: the steps, caching, the model version and its lineage."""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from lorapipe_app.cli import main
from tests.conftest import QUICKSTART_DATA, REPO_ROOT

pytestmark = pytest.mark.slow
STEPS = ["resolve_data_source", "validate_data", "preflight", "split_data", "train_adapter", "evaluate_base_model",
         "evaluate_model", "find_stage_holder", "score_stage_holder", "merge_model", "register_model"]
# never cached: the data source is looked at again, the stage holder may have changed, registration records the run
UNCACHED = ("resolve_data_source", "find_stage_holder", "register_model")


def _config(tmp, tiny_model_dir, data_path, model_name="lorapipe-test"):
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    cfg["data"]["paths"] = [str(data_path)]
    # hf on the CPU whatever the host (a CUDA box would pick unsloth): these tests are about the pipeline
    cfg["train"].update(backend="hf", device="cpu", epochs=1, max_seq_length=128, output_root=str(tmp / "runs"))
    cfg["evaluate"].update(max_samples=16, generation_samples=2, max_new_tokens=8)
    cfg["register"]["model_name"] = model_name
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _last_run():
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]


def _status(run):
    return {name: str(step.status).split(".")[-1].lower() for name, step in run.steps.items()}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    data = tmp / "data.jsonl"
    shutil.copy(QUICKSTART_DATA, data)
    cfg = _config(tmp, tiny_model_dir, data)
    out = {"cfg": cfg, "data": data}
    scratch = lambda: set(Path(tempfile.gettempdir()).glob("lorapipe-merged-*"))  # noqa: E731
    before = scratch()
    assert main(["run", "-c", str(cfg)]) == 0
    out["first"] = _last_run()
    out["merge_scratch_left"] = scratch() - before
    # the same bytes with a new modification time: the cache keys on content, so nothing trains; through the
    # Python API, which returns what the CLI prints
    os.utime(data, (data.stat().st_atime + 3600, data.stat().st_mtime + 3600))
    from lorapipe_app import run_finetune

    out["api_result"] = run_finetune(cfg)
    out["cached"] = _last_run()
    assert main(["run", "-c", str(cfg), "--set", "evaluate.max_new_tokens=4"]) == 0
    out["eval_changed"] = _last_run()
    # retraining with other hyperparameters (another rank, so another evaluation plan): the base is not scored again
    assert main(["run", "-c", str(cfg), "--set", "evaluate.max_new_tokens=4", "--set", "train.lora.r=8",
                 "--set", "train.learning_rate=2e-3"]) == 0
    out["retrained"] = _last_run()
    lines = data.read_text().splitlines(keepends=True)
    row = json.loads(lines[10])
    row["completion"] += " (edited)"
    lines[10] = json.dumps(row) + "\n"
    data.write_text("".join(lines))
    assert main(["run", "-c", str(cfg)]) == 0
    out["data_changed"] = _last_run()
    return out


def test_all_steps_complete_on_the_first_run(runs):
    assert _status(runs["first"]) == {s: "completed" for s in STEPS}


def test_the_validated_dataset_carries_the_reports_fingerprint(runs):
    from lorapipe.data.records import dataset_fingerprint

    outputs = runs["first"].steps["validate_data"].outputs
    dataset, report = outputs["validated_dataset"][0].load(), outputs["validation_report"][0].load()
    assert dataset.fingerprint == report.data_fingerprint == dataset_fingerprint(dataset.records)


def test_a_rerun_on_unchanged_data_is_served_from_cache_and_trains_nothing(runs):
    status = _status(runs["cached"])
    # the data source is looked at again on every run; what it found decides the cache of the rest
    for name in UNCACHED:
        assert status.pop(name) == "completed", name
    # the holder's scores come from the cache when the holder is the one the first run saw; when the first run took
    # the stage, the holder changed ("no version held it" -> "this version holds it"): the step ran, scoring nothing
    holder = runs["cached"].steps["score_stage_holder"].outputs["stage_holder_scores"][0].load()
    scoring = status.pop("score_stage_holder")
    assert scoring == "cached" or (scoring == "completed" and holder.scores is None), (scoring, holder)
    assert set(status.values()) == {"cached"}


def test_the_python_api_returns_the_run_version_and_metrics(runs):
    result = runs["api_result"]
    assert result.run.id == runs["cached"].id
    assert result.trained is False and "train_adapter" in result.cached_steps
    assert result.model_version == runs["first"].model_version.name  # unchanged data and config: the same version
    first_metrics = runs["first"].steps["evaluate_model"].outputs["eval_metrics"][0].load()
    assert result.metrics.tuned.perplexity == pytest.approx(first_metrics.tuned.perplexity)
    assert result.stage == "staging" and "beats base" in result.decision  # it holds staging already: kept
    assert Path(result.adapter_uri, "folder", "adapter_model.safetensors").is_file()


def test_changing_an_evaluation_setting_reruns_evaluate_onward_not_train(runs):
    status = _status(runs["eval_changed"])
    assert status["train_adapter"] == "cached" and status["validate_data"] == "cached"
    assert status["evaluate_model"] == "completed" and status["register_model"] == "completed"
    assert status["evaluate_base_model"] == "completed"  # the base's scores depend on the generation budget too


def test_retraining_with_other_hyperparameters_does_not_score_the_base_again(runs):
    status = _status(runs["retrained"])
    assert status["train_adapter"] == "completed" and status["evaluate_model"] == "completed"
    assert status["evaluate_base_model"] == "cached"
    base = runs["eval_changed"].steps["evaluate_base_model"].outputs["base_scores"][0].load()
    metrics = runs["retrained"].steps["evaluate_model"].outputs["eval_metrics"][0].load()
    before = runs["eval_changed"].steps["evaluate_model"].outputs["eval_metrics"][0].load()
    # the new adapter is compared with the same base figures, and it is a different adapter
    assert metrics.base == base.scores == before.base and metrics.row_losses["base"] == base.row_losses
    assert metrics.tuned.loss != before.tuned.loss


def test_changing_one_row_reruns_from_validate(runs):
    status = _status(runs["data_changed"])
    assert status["validate_data"] == "completed" and status["train_adapter"] == "completed"


def test_model_version_carries_lineage_and_no_empty_duplicates(runs):
    from zenml.client import Client

    client = Client()
    versions = client.list_model_versions(model="lorapipe-test", size=50).items
    # the first run and its cached re-run share one version (no empty duplicate); the evaluation change
    # the retraining and the data change each make a new one
    assert len(versions) == 4
    assert runs["first"].model_version.id == runs["cached"].model_version.id
    latest = runs["data_changed"]
    mv = client.get_model_version("lorapipe-test", latest.model_version.name)
    meta = mv.run_metadata
    for key in ("metrics", "plan", "data", "seed", "package_versions", "code", "merge_check", "base_model"):
        assert key in meta, key
    assert len(meta["data"]["files_sha256"]) == 64 and meta["seed"] == 42
    assert meta["package_versions"]["torch"].startswith("2.")
    assert meta["merge_check"]["passed"] is True
    # the merged model as served answered as base+adapter, and the template every render used is on the version
    parity = meta["merge_check"]["serving_parity"]
    assert parity["passed"] and parity["prompts"] == 4 and all(r["same_prompt_tokens"] for r in parity["rows"])
    template = meta["chat_template"]
    assert template["chat_template_source"] == "tokenizer" and template["chat_template_kwargs"] == {}
    assert len(template["chat_template_sha256"]) == 64
    assert len(meta["code"]["commit"]) == 40 or meta["code"]["commit"] == "unknown"
    metrics = latest.steps["evaluate_model"].outputs["eval_metrics"][0].load()
    assert meta["metrics"]["tuned_perplexity"] == pytest.approx(metrics.tuned.perplexity)
    # promotion rule: staging only when it beats the base and the version holding staging (the first run's), scored
    # on the same rows; promoting a newer version archives the older one, refusing says why
    decision = meta["stage_decision"]
    holder = latest.steps["score_stage_holder"].outputs["stage_holder_scores"][0].load()
    assert holder.stage == "staging" and holder.scores is not None and holder.candidate is not None
    if mv.stage:
        assert mv.stage == "staging" and "beats base" in decision and "the staging holder" in decision
        assert client.get_model_version("lorapipe-test", runs["first"].model_version.name).stage == "archived"
    else:
        assert "does not beat" in decision, decision


def test_adapter_artifact_is_a_peft_folder_loadable_from_the_store(runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs["first"].steps["train_adapter"].outputs["adapter"][0]
    from zenml.enums import ArtifactType

    assert adapter.type == ArtifactType.MODEL
    folder = adapter.load()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), folder.path)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    shown = {v.uri.rsplit("/", 1)[-1] for v in adapter.visualizations}
    assert {"training.html", "loss.png", "learning_rate.png", "memory.png"} <= shown  # in the dashboard
    summary = Path(adapter.uri, "training.html").read_text()
    planned = folder.metadata["plan"]["memory"]["total_gib"]
    measured = folder.metadata["result"]["peak_memory_gib"]
    assert "Memory: planned vs measured" in summary and f"{planned:,.4g}" in summary and f"{measured:,.4g}" in summary
    report = runs["first"].steps["validate_data"].outputs["validation_report"][0]
    assert {"token_lengths.png", "report.html"} <= {v.uri.rsplit("/", 1)[-1] for v in report.visualizations}
    # Great Expectations' own data docs need scripts from the internet: a file beside the report, not a view
    assert (Path(report.uri) / "great_expectations_data_docs.html").exists()
    merged = runs["first"].steps["merge_model"].outputs["merged_model"][0].load()
    assert AutoModelForCausalLM.from_pretrained(merged.path) is not None
    assert merged.metadata["check"]["passed"]
    # preflight's report (every check) and the recommended config, each with its dashboard view
    preflight = runs["first"].steps["preflight"].outputs
    checks = preflight["preflight_report"][0].load().checks
    assert checks and all(c.status in ("pass", "warn") for c in checks)
    recommended = preflight["recommended_config"][0]
    assert recommended.load().fragment["train"]["backend"] == "hf"
    assert {"report.html"} <= {v.uri.rsplit("/", 1)[-1] for v in recommended.visualizations}


def test_every_run_records_predicted_and_measured_memory_per_phase(runs):
    from zenml.client import Client

    memory = Client().get_model_version("lorapipe-test", runs["first"].model_version.name).run_metadata["memory"]
    for phase in ("train", "evaluate", "merge"):
        row = memory[phase]
        assert row["predicted_gib"] > 0 and row["measured_gib"] > 0 and row["resident_at_start_gib"] > 0, phase
        # on the CPU the prediction is set in the step's process (which already held ZenML and the data)
        here = row["predicted_gib"] - 0.51 * 2**30 / 2**30 + row["resident_at_start_gib"]
        assert row["predicted_in_process_gib"] == pytest.approx(here, abs=0.01)
        assert row["error"] == pytest.approx(row["predicted_in_process_gib"] / row["measured_gib"] - 1, abs=1e-3)


def test_no_cache_still_resumes_and_resume_false_starts_over(runs, capfd):
    """--no-cache re-runs every step, but training picks up its finished checkpoint instead of starting over."""
    assert main(["run", "-c", str(runs["cfg"]), "--no-cache"]) == 0
    assert "resuming from" in capfd.readouterr().out
    assert main(["run", "-c", str(runs["cfg"]), "--no-cache", "--set", "train.resume=false"]) == 0
    assert "resuming from" not in capfd.readouterr().out


def test_another_machine_is_planned_again_and_an_equal_plan_keeps_the_cache(runs, monkeypatch):
    """The machine is part of preflight's cache key. A second machine cannot exist here, so its fingerprint is
    faked; the probe itself still runs for real and finds this machine, so the plans come out the same and the
    steps keyed on the plans' content are served from the cache."""
    import lorapipe.hardware.probe as probe_module

    monkeypatch.setattr(probe_module, "machine_fingerprint", lambda: "a machine with other GPUs")
    assert main(["run", "-c", str(runs["cfg"])]) == 0
    status = _status(_last_run())
    assert status["validate_data"] == "cached" and status["preflight"] == "completed"
    assert status["split_data"] == "cached" and status["train_adapter"] == "cached"


def test_lineage_from_a_dataset_to_every_model_version_it_trained(runs, capsys):
    from zenml.client import Client

    edited = runs["data_changed"].model_version.name
    original = runs["first"].model_version.name
    assert main(["lineage", "--dataset", str(runs["data"])]) == 0  # the file as it is now: the edited data
    out = capsys.readouterr().out
    assert f"lorapipe-test version {edited}" in out and f"version {original} " not in out
    validated = Client().get_model_version("lorapipe-test", original).run_metadata["data"]["validated_sha256"]
    assert main(["lineage", "--dataset", validated]) == 0
    out = capsys.readouterr().out
    assert f"lorapipe-test version {original}" in out and "matched: validated rows" in out
    assert main(["lineage", "--dataset", "0" * 64]) == 1
    assert "no model version was trained on" in capsys.readouterr().err
    assert main(["lineage", "lorapipe-test", "--dataset", "0" * 64]) == 2


def test_the_merged_model_leaves_no_scratch_copy(runs):
    assert runs["merge_scratch_left"] == set()  # one copy, in the artifact store


def test_no_artifact_is_pickled(runs):
    import os

    for step in runs["first"].steps.values():
        for outputs in step.outputs.values():
            for art in outputs:
                for root, _, files in os.walk(art.uri):
                    assert not any(f.endswith((".pkl", ".pickle")) or f == "artifact.pkl" for f in files), root


def test_bad_data_fails_with_file_and_line_and_keeps_rejected_rows(tiny_model_dir, tmp_path, capsys):
    from zenml.client import Client

    data = tmp_path / "bad.jsonl"
    rows = QUICKSTART_DATA.read_text().splitlines(keepends=True)[:60]
    rows[4] = '{"prompt": "cut short", "completion": \n'
    data.write_text("".join(rows))
    cfg = _config(tmp_path, tiny_model_dir, data, model_name="lorapipe-bad")
    assert main(["run", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{data}:5" in err and "invalid JSON" in err and "Traceback" not in err
    rejected = Client().get_artifact_version("rejected_rows").load()
    assert [(r.line, r.raw.startswith('{"prompt": "cut short"')) for r in rejected.rows] == [(5, True)]
    # the CLI validator reports the same findings as the pipeline's validate step
    report = Client().get_artifact_version("validation_report").load()
    assert main(["validate", str(data), "--model", str(tiny_model_dir), "--max-seq-length", "128",
                 "--overlength", "truncate", "--json"]) == 1
    cli_report = json.loads(capsys.readouterr().out)  # stdout is pure JSON: logs go to stderr
    assert cli_report["problems"] == [dataclasses.asdict(p) for p in report.problems]
    assert cli_report["problem_counts"] == report.problem_counts


@pytest.mark.mlx
def test_the_mlx_backend_runs_the_whole_pipeline(tiny_model_dir, tmp_path):
    """train.backend=mlx on this Linux CPU (mlx[cpu]): an mlx-lm adapter, evaluated and fused by the same steps."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install -e '.[mlx]')")
    from lorapipe.backends.mlx import ADAPTER_WEIGHTS

    cfg = _config(tmp_path, tiny_model_dir, QUICKSTART_DATA, model_name="lorapipe-mlx")
    assert main(["run", "-c", str(cfg), "--set", "train.backend=mlx", "--set", "train.max_steps=6"]) == 0
    run = _last_run()
    status = _status(run)
    # the untuned base is scored by transformers whichever backend trains: when an earlier run on this store (this
    # module's hf runs) scored the same base on the same rows and settings, its scores come from the cache
    assert status.pop("evaluate_base_model") in ("completed", "cached")
    assert status == {s: "completed" for s in STEPS if s != "evaluate_base_model"}
    plan = run.steps["preflight"].outputs["training_plan"][0].load()
    assert (plan.backend, plan.device) == ("mlx", "cpu")  # _config pins train.device: cpu
    adapter = run.steps["train_adapter"].outputs["adapter"][0].load()
    assert adapter.metadata["adapter_format"] == "mlx-lm"
    assert (Path(adapter.path) / ADAPTER_WEIGHTS).exists()
    merged = run.steps["merge_model"].outputs["merged_model"][0].load()
    assert merged.metadata["check"]["passed"]
    metrics = run.steps["evaluate_model"].outputs["eval_metrics"][0].load()
    assert metrics.tuned.perplexity != metrics.base.perplexity


# -- what the dashboard shows -------------------------------------------------------------------------------------

def _all_outputs(run):
    for step_name, step in run.steps.items():
        for name, versions in step.outputs.items():
            yield step_name, name, versions[0]


def test_every_report_has_a_view_and_every_html_view_is_self_contained(runs):
    """The dashboard shows HTML in a frame that runs no scripts and, offline, loads nothing: no script, no URL."""
    import re

    reports = 0
    for step_name, name, artifact in _all_outputs(runs["first"]):
        views = artifact.visualizations or []
        if name in ("model_stage",):
            continue
        assert views, f"{step_name}.{name} has no visualization"
        for view in views:
            if not view.uri.endswith(".html"):
                continue
            reports += 1
            text = Path(view.uri).read_text()
            assert "<script" not in text.lower(), view.uri
            links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", text, flags=re.I)
            assert not [u for u in links if u.lower().startswith(("http://", "https://", "//"))], (view.uri, links)
            assert "<table" in text or "No row was rejected." in text, view.uri
    assert reports >= 9  # validation, rejected rows, probe, three plans, metrics, merged model, version report


def test_the_merged_model_carries_its_check_as_metadata_and_a_view(runs):
    merged = runs["first"].steps["merge_model"].outputs["merged_model"][0]
    assert merged.run_metadata["passed"] is True and merged.run_metadata["max_abs_logit_diff"] >= 0
    assert "model.safetensors" in merged.run_metadata["files"]
    [view] = [v for v in merged.visualizations if v.uri.endswith("merge_check.html")]
    assert "merge check passed" in Path(view.uri).read_text()


def test_the_evaluation_view_compares_base_and_tuned_side_by_side(runs):
    metrics_artifact = runs["first"].steps["evaluate_model"].outputs["eval_metrics"][0]
    metrics = metrics_artifact.load()
    assert len(metrics.row_losses["base"]) == len(metrics.row_losses["tuned"]) == metrics.scored_rows
    assert metrics.samples and {"prompt", "reference", "base", "tuned"} <= set(metrics.samples[0])
    html = Path(next(v.uri for v in metrics_artifact.visualizations if v.uri.endswith(".html"))).read_text()
    assert "Generations side by side" in html and 'src="data:image/png;base64,' in html
    assert f"{metrics.tuned.perplexity:,.4g}" in html and f"{metrics.base.perplexity:,.4g}" in html


def test_the_model_version_report_says_what_lineage_says(runs, capsys, monkeypatch):
    """The register step's report artifact (and its HTML), the version's metadata and `lorapipe lineage` agree, for
    the latest registration of the version (a later re-run of the same config registers the same version again);
    lineage reads as a tree from the model version down to the data's sha256."""
    from zenml.client import Client

    from lorapipe.registry import VersionReport

    client = Client()
    version = runs["data_changed"].model_version
    latest = next(r for r in client.list_pipeline_runs(sort_by="desc:created", size=30).items
                  if r.model_version and r.model_version.id == version.id)
    artifact = latest.steps["register_model"].outputs["model_version_report"][0]
    report = artifact.load()
    mv = client.get_model_version("lorapipe-test", version.name)
    assert report == VersionReport(**mv.run_metadata["report"])
    assert report.version == version.name and report.decision and report.stage in ("staging", "none")
    assert report.run["id"] == str(latest.id)
    assert set(report.artifacts) >= {"adapter", "merged_model", "eval_metrics", "training_plan"}
    assert report.artifacts["adapter"] == str(latest.steps["train_adapter"].outputs["adapter"][0].id)
    html = Path(next(v.uri for v in artifact.visualizations if v.uri.endswith(".html"))).read_text()
    import html as html_lib

    assert html_lib.escape(report.decision) in html and report.data["validated_sha256"] in html
    capsys.readouterr()
    # ZenML warns "ModelVersionResponse.pipeline_runs is deprecated" on every read of it: lineage must not read it
    from zenml.models import ModelVersionResponse

    def deprecated(self):
        raise AssertionError("lineage read ModelVersionResponse.pipeline_runs, which prints a deprecation line")

    monkeypatch.setattr(ModelVersionResponse, "pipeline_runs", property(deprecated))
    assert main(["lineage", f"lorapipe-test:{report.version}"]) == 0
    out = capsys.readouterr().out
    for fact in (report.decision, report.data["files_sha256"], report.data["validated_sha256"],
                 report.data["train_split_sha256"], report.run["id"], f"stage {mv.stage or 'none'}"):
        assert fact in out, fact
    lines = out.splitlines()
    order = [next(i for i, line in enumerate(lines) if marker in line)
             for marker in ("merged model", "adapter", "plan", "train_split", "validated dataset", "data ")]
    assert order == sorted(order), out  # each level is made from the one below it
    assert main(["lineage", "lorapipe-test", "--version", report.version, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["merged_model"]["id"] == report.artifacts["merged_model"]
    adapter = tree["merged_model"]["adapter"]
    assert adapter["id"] == report.artifacts["adapter"] and adapter["plan"]["backend"] == "hf"
    assert adapter["splits"]["train_split"]["sha256"] == report.data["train_split_sha256"]
    assert adapter["validated_dataset"]["sha256"] == report.data["validated_sha256"]
    assert adapter["validated_dataset"]["data"]["sha256"] == report.data["files_sha256"]
    assert adapter["validated_dataset"]["data"]["files"] == [str(runs["data"])]
    # by stage: the version holding staging, if the rule promoted one
    if mv.stage:
        assert main(["lineage", f"lorapipe-test:{mv.stage}", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == mv.name
    assert main(["lineage", "lorapipe-test:production"]) == 1
    assert "has no stage production" in capsys.readouterr().err


def test_promotion_is_earned_against_the_stage_holder_on_the_same_rows(runs):
    """A short training takes production (it beats the base, nothing holds the stage); a full training beats it
    on this run's test rows and takes over (the short one is archived, not deleted); the same full training again,
    with a margin, does not beat itself and is refused with the holder named, which keeps production."""
    from zenml.client import Client

    cfg = str(runs["cfg"])
    common = ["--set", "register.stage_if_better=production", "--set", "register.model_name=lorapipe-promotion"]
    assert main(["run", "-c", cfg, *common, "--set", "train.max_steps=4"]) == 0
    short = _last_run()
    assert main(["run", "-c", cfg, *common]) == 0
    full = _last_run()
    assert main(["run", "-c", cfg, *common, "--set", "register.margin=0.001"]) == 0
    again = _last_run()
    client = Client()

    def report(run):
        return run.steps["register_model"].outputs["model_version_report"][0].load()

    def holder_scores(run):
        return run.steps["score_stage_holder"].outputs["stage_holder_scores"][0].load()

    assert report(short).stage == "production" and "beats base" in report(short).decision
    assert holder_scores(short).scores is None and "no version held production" in holder_scores(short).note

    assert report(full).stage == "production", report(full).decision
    assert f"version {short.model_version.name}, the production holder" in report(full).decision
    scored = holder_scores(full)
    assert scored.version == short.model_version.name and scored.scores["perplexity"] > 0
    assert client.get_model_version("lorapipe-promotion", short.model_version.name).stage == "archived"

    refused = report(again)
    assert refused.stage == "none" and again.model_version.id != full.model_version.id
    assert f"does not beat version {full.model_version.name}, which holds production" in refused.decision, \
        refused.decision
    assert refused.production_version == full.model_version.name
    # the holder and this version's merged model (the same merge, served from the cache) scored alike: equal
    alike = holder_scores(again)
    assert alike.version == full.model_version.name
    assert alike.candidate["perplexity"] == pytest.approx(alike.scores["perplexity"], rel=1e-6)
    # and close to what the evaluate step measured for base + adapter before the 16-bit merge
    full_metrics = full.steps["evaluate_model"].outputs["eval_metrics"][0].load()
    perplexity = next(m for m in refused.metrics if m["metric"] == "perplexity")
    assert perplexity["production"] == pytest.approx(full_metrics.tuned.perplexity, rel=1e-2)
    assert client.get_model_version("lorapipe-promotion", full.model_version.name).stage == "production"
    # a holder is scored once per test split and settings: a re-run against the same holder is served from the cache
    assert again.steps["score_stage_holder"].status == "completed"  # a new holder since the run before
    assert main(["run", "-c", cfg, *common, "--set", "register.margin=0.002"]) == 0
    repeat = _last_run()
    assert (_status(repeat)["find_stage_holder"], _status(repeat)["score_stage_holder"]) == ("completed", "cached")
    assert holder_scores(repeat) == holder_scores(again) and report(repeat).stage == "none"


def test_an_html_view_renders_in_a_real_browser(runs):
    """Headless Chromium (Debian's package, driven by Playwright without a browser download) opens the evaluation
    view at the width a laptop dashboard has: the tables are visible and nothing runs off the right edge."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    artifact = runs["first"].steps["evaluate_model"].outputs["eval_metrics"][0]
    page_file = Path(next(v.uri for v in artifact.visualizations if v.uri.endswith(".html")))
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
        except sync_api.Error as exc:
            pytest.skip(f"{chromium} is installed but does not start headless here: {str(exc).splitlines()[0]}")
        try:
            for width in (1400, 860):  # a laptop's dashboard, and its side sheet where the view opens
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(page_file.as_uri())
                assert page.locator("table").first.is_visible()
                assert page.locator("td").count() > 10
                assert page.locator("img").first.is_visible()
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                # no cell's text runs past the cell (it wraps at word breaks instead)
                assert page.evaluate("[...document.querySelectorAll('td')].filter("
                                     "td => td.scrollWidth > td.clientWidth + 1).length") == 0
        finally:
            browser.close()


def test_runs_lists_status_cache_and_model_version(runs, capsys):
    assert main(["runs", "-n", "30", "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    first, cached = listed[str(runs["first"].id)], listed[str(runs["cached"].id)]
    assert first["status"] == "completed" and first["trained"] and first["cached_steps"] == []
    assert cached["trained"] is False and "train_adapter" in cached["cached_steps"]
    assert cached["model_version"] == first["model_version"] == runs["first"].model_version.name
    assert first["duration_s"] > 0 and first["model"] == "lorapipe-test"
    assert main(["runs"]) == 0
    table = capsys.readouterr().out
    assert runs["data_changed"].name[:40] in table and "lorapipe-test" in table


def test_watch_finds_a_runs_training_folder_from_the_run_name(runs, capsys):
    assert main(["watch", runs["first"].name, "--no-follow"]) == 0
    out = capsys.readouterr().out
    assert "training finished after" in out and "loss" in out


def test_predict_answers_from_a_registered_version_and_from_an_adapter_folder(runs, capsys, tmp_path):
    version = runs["first"].model_version.name
    assert main(["predict", f"lorapipe-test:{version}", "What is new in SwiftUI?", "-p", "Hello",
                 "--max-new-tokens", "8", "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["prompt"] for a in answers] == ["What is new in SwiftUI?", "Hello"]
    assert all(0 < a["new_tokens"] <= 8 and isinstance(a["stopped"], bool) for a in answers)
    # a file of prompts, through the version's base model + adapter instead of its merged model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "a reference"}]})
        + "\nplain text\n")
    assert main(["predict", f"lorapipe-test:{version}", "--adapter", "--file", str(prompts),
                 "--max-new-tokens", "4", "--json"]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == ["Hi", "Tell me",
                                                                                             "plain text"]
    adapter = runs["first"].steps["train_adapter"].outputs["adapter"][0].load().path
    assert main(["predict", adapter, "-p", "Hello", "--max-new-tokens", "4", "--stream"]) == 0
    out = capsys.readouterr()
    assert "adapter" in out.err and out.out.startswith("> Hello")
    assert main(["predict", "lorapipe-test:0000000000000000", "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert "has no version 0000000000000000; it has versions" in err and version in err


def test_lineage_of_a_version_lorapipe_did_not_register_says_it_has_no_run(runs, capsys, monkeypatch):
    """A version made by hand (no lorapipe report in its metadata): lineage looks for a run linked to it, through the
    store's links (not the deprecated pipeline_runs), and says in one line that there is none."""
    from zenml.client import Client
    from zenml.models import ModelVersionResponse

    def deprecated(self):
        raise AssertionError("lineage read ModelVersionResponse.pipeline_runs")

    monkeypatch.setattr(ModelVersionResponse, "pipeline_runs", property(deprecated))
    client = Client()
    model = client.create_model(name="lorapipe-made-by-hand")
    client.create_model_version(model_name_or_id=model.id, name="by-hand")
    capsys.readouterr()
    assert main(["lineage", "lorapipe-made-by-hand", "--version", "by-hand"]) == 1
    err = capsys.readouterr().err
    assert "version by-hand has no pipeline run in this store" in err and "Traceback" not in err


def test_a_mixture_is_recorded_per_source_and_found_by_one_of_its_files(tiny_model_dir, tmp_path, capsys):
    """data.sources: the version records each source's sha256, rows drawn and share; `lineage --dataset` finds it by
    one source's file (before mixtures a file matched only a run's whole data); the validation view shows the mix."""
    from zenml.client import Client

    lines = QUICKSTART_DATA.read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(lines[:60]))
    second.write_text("".join(lines[60:120]))
    cfg_path = _config(tmp_path, tiny_model_dir, first, model_name="lorapipe-mixture")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"] = {"sources": [{"path": str(first), "name": "first", "weight": 1},
                               {"path": str(second), "name": "second", "weight": 1}], "mixture_rows": 80}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "-c", str(cfg_path)]) == 0
    capsys.readouterr()
    version = Client().get_model_version("lorapipe-mixture", "latest")
    data = version.run_metadata["data"]
    assert data["rows_sampled"] == 80
    shares = {s["name"]: (s["rows_sampled"], s["share"], s["sha256"]) for s in data["sources"]}
    from lorapipe.data.formats import file_fingerprint

    assert shares == {"first": (40, 0.5, file_fingerprint([str(first)])),
                      "second": (40, 0.5, file_fingerprint([str(second)]))}
    assert main(["lineage", "--dataset", str(second)]) == 0
    out = capsys.readouterr().out
    assert f"lorapipe-mixture version {version.name}" in out and "source second (50% of the rows)" in out
    assert main(["lineage", "lorapipe-mixture"]) == 0
    assert "source second: 40 of 60 accepted rows (50.0%)" in capsys.readouterr().out
    report = _last_run().steps["validate_data"].outputs["validation_report"][0].load()
    from materializers.reports import validation_html

    assert "Mixture: 80 rows drawn" in validation_html(report)


def test_the_stage_is_deployed_through_zenml_and_a_new_holder_is_served_at_the_same_url(runs, capsys):
    """`lorapipe deploy staging`: ZenML's local deployer serves the inference pipeline over HTTP (a daemon process on
    this machine); its answer is predict's with the staging holder; after another version takes the stage, the same
    URL answers with it, no redeploy; `zenml deployment list` has it; --delete stops it."""
    import urllib.request

    from zenml.client import Client

    from lorapipe.phases.predict import generate, load_for_inference
    from lorapipe_app.cli.models import _model_folder

    client = Client()
    before = client.active_stack_model.name
    if "lorapipe-deploy-test" not in {c.name for c in client.list_stack_components(type="deployer").items}:
        client.create_stack_component(name="lorapipe-deploy-test", flavor="local", component_type="deployer",
                                      configuration={})
        client.create_stack(name="lorapipe-deploy-test", components={
            "orchestrator": client.active_stack_model.components["orchestrator"][0].name,
            "artifact_store": client.active_stack_model.components["artifact_store"][0].name,
            "deployer": "lorapipe-deploy-test"})
    client.activate_stack("lorapipe-deploy-test")
    name = "lorapipe-test-staging"

    def invoke(url: str, prompt: str) -> dict:
        request = urllib.request.Request(url.rstrip("/") + "/invoke", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"parameters": {"prompt": prompt}}).encode())
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    try:
        assert main(["deploy", "staging", "--model", "lorapipe-test", "--max-new-tokens", "8"]) == 0
        assert f"deployed {name}" in capsys.readouterr().out
        deployment = client.get_deployment(name)
        assert deployment.url and name in {d.name for d in client.list_deployments().items}
        holder = client.get_model_version("lorapipe-test", "staging")
        out = invoke(deployment.url, "What did Apple announce at WWDC25?")
        assert out["success"], "\n".join(list(client.get_deployment_logs(name))[-40:])
        assert out["outputs"].get("model_version") == f"lorapipe-test:{holder.name}", out["outputs"]
        model, tokenizer, _ = load_for_inference(_model_folder(f"lorapipe-test:{holder.name}", False), "cpu",
                                                 "float32")
        expected = generate(model, tokenizer, "What did Apple announce at WWDC25?", 8)["completion"]
        assert out["outputs"]["answer"] == expected
        other = next(v for v in client.list_model_versions(model="lorapipe-test", size=50).items
                     if v.id != holder.id and (v.model_artifacts.get("merged_model") or
                                               v.data_artifacts.get("merged_model")))
        other.set_stage("staging", force=True)  # a new holder: the running deployment serves it
        again = invoke(client.get_deployment(name).url, "Hi")
        assert again["outputs"]["model_version"] == f"lorapipe-test:{other.name}"
        assert client.get_deployment(name).url == deployment.url
    finally:
        holder.set_stage("staging", force=True) if "holder" in locals() else None
        if name in {d.name for d in client.list_deployments().items}:
            assert main(["deploy", "--delete", name]) == 0
        client.activate_stack(before)
    assert name not in {d.name for d in client.list_deployments().items}
