"""A model that is not there is caught before the pipeline starts, with the key and the fix. This machine reaches
no model hub, so the hub's answers here are the real ones of an unreachable hub or offline mode."""

import json

import pytest

from lorapipe.models.locate import model_problem
from lorapipe_app.cli import main
from tests.conftest import REPO_ROOT


def test_a_saved_model_folder_passes(tiny_model_dir):
    assert model_problem(str(tiny_model_dir)) is None


def test_a_missing_local_folder_names_the_key_and_how_to_build_it(tmp_path):
    problem = model_problem("./models/tiny-llama", base_dir=tmp_path)
    assert problem.startswith("model.name_or_path: ./models/tiny-llama is not a folder here")
    assert "make tiny-model" in problem and str(tmp_path) in problem
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "without a config.json" in model_problem(str(empty))


def test_a_relative_path_that_could_be_a_hub_id_gets_both_fixes(tmp_path):
    """`models/tiny-llama` before `make tiny-model`: a valid hub id in form, not cached, and offline here."""
    problem = model_problem("models/tiny-llama", base_dir=tmp_path)
    assert "not a folder here" in problem and "HF_HUB_OFFLINE is set" in problem and "make tiny-model" in problem


def test_a_comment_glued_to_the_id_is_not_a_hub_id():
    problem = model_problem("meta-llama/Llama-3.1-8B-Instruct# hub id or local folder")
    assert "nor a valid hub id" in problem and "space before a # comment" in problem


def test_a_model_in_the_hub_cache_passes_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    assert model_problem("org/tiny") is None
    assert "not in the local hub cache" in model_problem("org/other")


def test_an_unreachable_hub_is_said_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # lorapipe then asks the hub, which cannot answer here
    problem = model_problem("org/not-cached", base_dir=tmp_path)
    assert "the hub cannot be reached" in problem and "\n" not in problem


def test_run_stops_before_the_pipeline_with_one_paragraph(tmp_path, capsys):
    cfg = (REPO_ROOT / "configs" / "quickstart.yaml").read_text().replace(
        "name_or_path: models/tiny-llama", f"name_or_path: {tmp_path / 'no-model'}")
    data = REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
    cfg = cfg.replace("paths: [data/quickstart/wwdc25_train_slice.jsonl]", f"paths: [{data}]")
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg)
    assert main(["run", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "model.name_or_path" in err and "make tiny-model" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_names_a_model_the_check_understands(config):
    """The seed configs' ids pass the form check; here (offline) they are reported as not cached, never as invalid."""
    from lorapipe.config import load_config
    from lorapipe_app.api import names_registered_version

    cfg = load_config(REPO_ROOT / "configs" / config)
    if names_registered_version(cfg.model.name_or_path, REPO_ROOT):  # looked up in the store, not here
        return
    problem = model_problem(cfg.model.name_or_path, cfg.model.revision, base_dir=REPO_ROOT)
    assert problem is None or "nor a valid hub id" not in problem


def test_a_changed_local_model_folder_is_a_new_cache_key_for_every_step_that_reads_it(tiny_model_dir, tmp_path):
    """The steps take `model` as a parameter, so its folder fingerprint is in their cache keys: a base re-merged or
    re-downloaded at the same path trains and scores again instead of being served from the cache."""
    import shutil

    from lorapipe_app.api import prepare

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = {"model": {"name_or_path": str(base)}, "data": {"paths": [str(REPO_ROOT / "data" / "quickstart" /
                                                                           "wwdc25_train_slice.jsonl")]},
              "train": {"output_root": str(tmp_path / "runs")}}
    first = prepare(config, base_dir=tmp_path).config.model.folder_fingerprint
    assert first and prepare(config, base_dir=tmp_path).config.model.folder_fingerprint == first
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")  # the same path, other bytes
    assert prepare(config, base_dir=tmp_path).config.model.folder_fingerprint != first
    from lorapipe.models.locate import folder_fingerprint

    assert folder_fingerprint("meta-llama/Llama-3.1-8B-Instruct") is None  # a hub id: its revision keys the cache
