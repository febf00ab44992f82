"""Merge and export on the tiny model: a real adapter (a few hf training steps), merged into real folders, reloaded,
checked; a corrupted merge is caught; and the merge step on a real ZenML store leaves one copy of the weights."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lorapipe.hardware.plan import PhasePlan

# slow: trains (the session's tiny hf adapter, once; tests/conftest.py keeps this module in its worker) and merges
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]


def merge_plan(dtype: str = "float32") -> PhasePlan:
    return PhasePlan(phase="merge", device="cpu", dtype=dtype, batch_size=1, max_seq_length=256, reason="test")


@pytest.fixture(scope="module")
def trained(hf_adapter):
    """The session's tiny hf adapter (tests/conftest.py): trained once for training's, evaluation's and merge's
    tests."""
    return hf_adapter


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    from lorapipe.phases.merge import merge_adapter

    out = tmp_path_factory.mktemp("merged") / "model"
    check = merge_adapter(trained["adapter"], str(out), trained["test"], merge_plan("float32"), parity_samples=3,
                          parity_max_new_tokens=8)
    return {"out": out, "check": check}


def test_a_float32_merge_equals_base_plus_adapter(merged):
    check = merged["check"]
    assert check.passed and check.max_abs_logit_diff <= 1e-4 and check.rows_checked == 4
    assert check.greedy_agreement == 1.0 and check.positions_checked > 0
    # the reference logits were set aside beside the output while the merged model was checked, then removed
    assert not list(merged["out"].parent.glob(".lorapipe-merge-check-*"))


def test_the_merged_folder_loads_and_describes_itself(merged, trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapipe.data.end_tokens import end_token_ids

    out = merged["out"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == end_token_ids(tokenizer) and isinstance(generation["eos_token_id"], list)

    card = (out / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    meta = yaml.safe_load(front)
    assert meta["base_model"] == str(tiny_model_dir) and meta["library_name"] == "transformers"
    assert {"lorapipe", "lora", "merged"} <= set(meta["tags"])
    assert meta["lorapipe"]["train_data_sha256"] == trained["train"].fingerprint
    assert meta["lorapipe"]["merged_dtype"] == "float32" and meta["lorapipe"]["merge_check_passed"] is True
    assert "## Merge check" in body and "greedy-token agreement | 1 |" in body
    assert f"the test split held\n  {len(trained['test'])} rows" in body and "ZenML" in body

    modelfile = (out / "Modelfile").read_text()
    assert "\nFROM .\n" in modelfile and 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    record = json.loads((out / "lorapipe_merge.json").read_text())
    assert record["check"] == merged["check"].model_dump() and record["ollama"]["family"] == "ChatML"


def test_a_second_merge_of_the_same_adapter_is_a_no_op(merged, trained, capsys):
    from lorapipe.phases.merge import merge_adapter

    out = merged["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = merge_adapter(trained["adapter"], str(out), trained["test"], merge_plan("float32"))
    assert "already merged" in capsys.readouterr().out
    assert again == merged["check"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_folder_holding_another_adapters_merge_is_refused(merged, trained, tmp_path):
    import shutil

    from lorapipe.phases.merge import merge_adapter

    other = tmp_path / "other"
    shutil.copytree(merged["out"], other)
    record = json.loads((other / "lorapipe_merge.json").read_text())
    record["settings"]["adapter_fingerprint"] = "0" * 64
    (other / "lorapipe_merge.json").write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match="holds the merge of another adapter"):
        merge_adapter(trained["adapter"], str(other), trained["test"], merge_plan("float32"))


def test_shards_respect_max_shard_size(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorapipe.config import shard_bytes
    from lorapipe.phases.merge import merge_adapter

    out = tmp_path / "sharded"
    check = merge_adapter(trained["adapter"], str(out), trained["test"], merge_plan("bfloat16"),
                          check_samples=2, max_shard_size="200KB")
    assert check.passed and check.dtype == "bfloat16"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        tensors = load_file(str(shard))
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        # a shard holds at most max_shard_size of tensors, unless one tensor alone is larger
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= shard_bytes("200KB") or len(tensors) == 1
    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None


def test_the_merged_folder_as_served_answers_as_base_plus_adapter(merged):
    parity = merged["check"].serving_parity
    assert parity["passed"] and parity["prompts"] == 3 and parity["identical"] == 3 and parity["form"] == "merged"
    assert all(r["same_prompt_tokens"] and r["first_divergence"] is None and r["adapter_tokens"] > 0
               for r in parity["rows"])
    saved = json.loads((merged["out"] / "lorapipe_merge.json").read_text())
    assert saved["check"]["serving_parity"] == parity  # stored with the folder (and, through it, on the version)


def test_a_merged_tokenizer_with_another_template_fails_parity_and_blocks_promotion(trained, tmp_path):
    """A deliberately broken export: the merged folder's tokenizer carries another chat template. The logits check
    (token ids made once, with training's tokenizer) cannot see it; the parity check renders the prompts with the
    folder's own tokenizer, as a server would, and the version is not promoted with that reason."""
    from lorapipe.data.render import FALLBACK_CHAT_TEMPLATE
    from lorapipe.phases.merge import merge_adapter
    from lorapipe.registry import decide_stage
    from tests.test_promotion import _metrics

    def another_template(folder: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # Alpaca-style, not the template training used
        tokenizer.save_pretrained(str(folder))

    check = merge_adapter(trained["adapter"], str(tmp_path / "broken"), trained["test"], merge_plan("float32"),
                          before_check=another_template, parity_samples=2, parity_max_new_tokens=4)
    assert check.passed  # the logits agree: the weights are right
    parity = check.serving_parity
    assert not parity["passed"] and not any(r["same_prompt_tokens"] for r in parity["rows"])
    assert "renders 2 of 2 prompts to other tokens than training did" in parity["reason"]
    metrics = _metrics()  # a tuned model that beats its base
    stage, reason = decide_stage(metrics, check.passed, "staging", 0.0, serving_parity=parity)
    assert stage is None and reason.startswith("the merged model as served answers differently from its adapter: "
                                               "the served tokenizer renders 2 of 2 prompts")
    assert decide_stage(metrics, check.passed, "staging", 0.0, serving_parity={**parity, "passed": True})[0] == \
        "staging"


def test_a_corrupted_merge_is_caught(trained, tmp_path):
    from lorapipe.phases.merge import MergeCheckFailed, merge_adapter

    def corrupt_one_weight(folder: Path) -> None:
        shard = folder / "model.safetensors"
        tensors = load_file(str(shard))
        name = next(n for n in tensors if n.endswith("self_attn.o_proj.weight"))
        tensors[name][0, :] += 0.5  # one row of one merged projection
        save_file(tensors, str(shard), metadata={"format": "pt"})

    check = merge_adapter(trained["adapter"], str(tmp_path / "bad"), trained["test"], merge_plan("float32"),
                          before_check=corrupt_one_weight)
    assert not check.passed and check.max_abs_logit_diff > check.tolerance
    with pytest.raises(MergeCheckFailed, match=r"differ from base\+adapter by up to [\d.e+-]+ .* above the "
                                               r"tolerance 0\.0001 for float32"):
        check.require_passed()


def test_a_qlora_adapter_is_merged_into_the_16_bit_base_and_says_why(trained, tmp_path, capsys):
    """An adapter whose plan says nf4 (a copy of the real one, relabelled: bitsandbytes needs CUDA) is merged into
    the unquantised base, with the reason in the log and the card."""
    import shutil

    from lorapipe.phases.merge import merge_adapter

    adapter = tmp_path / "qlora-adapter"
    shutil.copytree(trained["adapter"], adapter)
    meta = json.loads((adapter / "lorapipe_adapter.json").read_text())
    meta["plan"]["quantization"] = "nf4"
    (adapter / "lorapipe_adapter.json").write_text(json.dumps(meta))
    check = merge_adapter(str(adapter), str(tmp_path / "merged"), trained["test"], merge_plan("bfloat16"),
                          check_samples=1)
    assert check.passed
    assert "merging into a bfloat16 copy of the unquantised base" in capsys.readouterr().out
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "qlora" in yaml.safe_load(card.split("---\n")[1])["tags"] and "4-bit base" in card


# -- the step on a real ZenML store ----------------------------------------------------------------------------------
# ZenML loads steps by their source: they live at module level and take paths, not objects.

def _merge_only_pipeline():
    from typing import Annotated

    from zenml import pipeline, step

    from lorapipe.artifacts import AdapterFolder
    from lorapipe.config import MergeSection
    from lorapipe.data.dataset import ConversationDataset
    from materializers import (
        AdapterFolderMaterializer,
        ConversationDatasetMaterializer,
        ReportMaterializer,
    )
    from steps import merge_model

    global given_adapter, given_rows, given_plan, merge_only

    @step(output_materializers=AdapterFolderMaterializer, enable_cache=False)
    def given_adapter(path: str) -> Annotated[AdapterFolder, "adapter"]:
        return AdapterFolder.from_folder(path)

    @step(output_materializers=ConversationDatasetMaterializer, enable_cache=False)
    def given_rows(folder: str) -> Annotated[ConversationDataset, "test_split"]:
        return ConversationDataset.read(folder)

    @step(output_materializers=ReportMaterializer, enable_cache=False)
    def given_plan(dtype: str) -> Annotated[PhasePlan, "merge_plan"]:
        return merge_plan(dtype)

    @pipeline(enable_cache=False)
    def merge_only(adapter_path: str, rows_folder: str) -> None:
        merge_model(adapter=given_adapter(adapter_path), test_split=given_rows(rows_folder),
                    merge_plan=given_plan("bfloat16"),
                    merge=MergeSection(dtype="bfloat16", check_samples=2, max_shard_size="2GB"))

    return merge_only


def test_the_merge_step_writes_one_copy_into_the_store(trained, tmp_path, monkeypatch):
    """The merged shards are written straight into the artifact's folder: no scratch folder is made, the store
    holds them once, and the check is the artifact's metadata and view."""
    from types import SimpleNamespace

    from zenml.client import Client

    import steps.merge
    from lorapipe_app.api import use_repo_as_source_root

    def no_scratch(**_):
        raise AssertionError("the merge step made a scratch folder on a local artifact store")

    monkeypatch.setattr(steps.merge, "tempfile", SimpleNamespace(mkdtemp=no_scratch))

    use_repo_as_source_root()  # the cache policy names library files relative to the repository
    trained["test"].write(tmp_path / "rows")
    store = Path(Client().active_stack.artifact_store.path)
    weights = lambda: set(store.rglob("model*.safetensors"))  # noqa: E731 - the session's store: other tests' too
    scratch = lambda: set(Path(tempfile.gettempdir()).glob("lorapipe-merged-*"))  # noqa: E731
    weights_before, scratch_before = weights(), scratch()
    _merge_only_pipeline()(adapter_path=trained["adapter"], rows_folder=str(tmp_path / "rows"))
    assert scratch() == scratch_before
    run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
    artifact = run.steps["merge_model"].outputs["merged_model"][0]
    folder = Path(artifact.uri) / "folder"
    assert (folder / "model.safetensors").exists() and (folder / "README.md").exists()
    assert sorted(p.name for p in Path(artifact.uri).iterdir()) == ["folder", "merge_check.html"]
    assert weights() - weights_before == {folder / "model.safetensors"}
    assert artifact.run_metadata["greedy_agreement"] >= 0.5 and artifact.run_metadata["passed"] is True
    assert artifact.run_metadata["weight_shards"] == 1 and artifact.run_metadata["storage_size"] > 0
    assert "greedy-token agreement" in (Path(artifact.uri) / "merge_check.html").read_text()
    assert artifact.load().metadata["check"]["passed"]


def test_the_materializer_moves_a_scratch_folder_into_a_local_store(merged, tmp_path):
    """A temporary folder (the step's scratch when it cannot write in place) is moved in, not copied: afterwards
    it is gone, the store holds the files, and metadata and view read the stored copy."""
    import shutil

    from lorapipe.artifacts import ModelFolder
    from materializers import ModelFolderMaterializer

    scratch = tmp_path / "lorapipe-merged-scratch"
    shutil.copytree(merged["out"], scratch)
    uri = tmp_path / "store" / "merged_model" / "1"
    uri.mkdir(parents=True)  # ZenML creates the output's URI before the step runs
    materializer = ModelFolderMaterializer(str(uri))
    data = ModelFolder.from_folder(scratch, temporary=True)
    materializer.save(data)
    assert not scratch.exists() and data.path == str(uri / "folder")
    assert (uri / "folder" / "model.safetensors").exists()
    meta = materializer.extract_metadata(data)
    assert meta["passed"] is True and meta["weight_shards"] == 1 and meta["ollama_template"] == "ChatML"
    [view] = materializer.save_visualizations(data)
    assert "merge check passed" in Path(view).read_text()
