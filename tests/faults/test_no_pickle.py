"""No pickle: every artifact a run stores loads back through a materializer that writes plain formats (lorapipe's own,
or ZenML's non-pickle built-ins), no stored file is a pickle stream, and every `torch.load` in the code passes
`weights_only=True`. tests/test_pipeline.py's `test_no_artifact_is_pickled` checks the file names of one run's
artifacts; this adds the materializers, the bytes, the model version's artifacts and the code."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CODE = ("lorapipe", "steps", "materializers", "pipelines")
# ZenML's built-in materializers that write JSON/text/bytes (never its cloudpickle fallback)
ZENML_PLAIN = {
    "zenml.materializers.built_in_materializer.BuiltInMaterializer",
    "zenml.materializers.built_in_materializer.BuiltInContainerMaterializer",
    "zenml.materializers.built_in_materializer.BytesMaterializer",
    "zenml.materializers.pydantic_materializer.PydanticMaterializer",
    "zenml.materializers.structured_string_materializer.StructuredStringMaterializer",
    "zenml.materializers.path_materializer.PathMaterializer",
    "zenml.materializers.uuid_materializer.UUIDMaterializer",
}
PICKLE_LOADERS = {"pickle", "cloudpickle", "dill", "joblib", "_pickle"}


@pytest.mark.slow
def test_every_artifact_loads_through_a_plain_materializer_and_holds_no_pickle_stream(pipeline_runs):
    store = pipeline_runs.store
    arts = store["artifacts"] + store["model_version"]["artifacts"]
    opened = 0
    assert {a["name"] for a in arts} >= {"adapter", "merged_model", "eval_metrics", "train_split", "training_plan"}
    for art in arts:
        assert "load_error" not in art, art
        source = art["materializer"]
        assert source.startswith("materializers.") or source in ZENML_PLAIN, (art["name"], source)
        for root, _, files in os.walk(art["uri"]):
            for name in files:
                opened += 1
                assert not pickled(Path(root) / name), (art["name"], name)
    assert opened >= 20  # the adapter's, the merged model's and the splits' files were all read


def _is_pickle_stream(head: bytes) -> bool:
    """A pickle stream starts with PROTO (0x80) and a protocol number 2..5."""
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def pickled(path: Path) -> bool:
    """The file is a pickle stream, or a zip holding one (torch.save's format: `archive/data.pkl` beside the tensor
    storages), checked member by member; nested zips too."""
    import io
    import zipfile

    data = path.read_bytes()
    pending = [data]
    while pending:
        blob = pending.pop()
        if _is_pickle_stream(blob[:2]):
            return True
        if blob[:4] == b"PK\x03\x04" and zipfile.is_zipfile(io.BytesIO(blob)):
            with zipfile.ZipFile(io.BytesIO(blob)) as archive:
                for member in archive.namelist():
                    if member.endswith((".pkl", ".pickle")):
                        return True
                    pending.append(archive.read(member))
    return False


def test_the_pickle_check_sees_a_torch_file_and_a_pickle_inside_a_zip(tmp_path):
    """The check itself: torch.save's zip (whose data.pkl a two-byte look at the file misses), a plain pickle, a
    pickle zipped under another name; safetensors and JSON pass."""
    import json
    import pickle
    import zipfile

    import torch
    from safetensors.torch import save_file

    torch.save({"w": torch.ones(2)}, tmp_path / "optimizer.pt")
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as z:
        z.writestr("inner/state", pickle.dumps([1, 2], protocol=2))
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert (tmp_path / "optimizer.pt").read_bytes()[:2] == b"PK"  # what the old two-byte look let through
    assert [pickled(tmp_path / n) for n in ("optimizer.pt", "plain.bin", "bundle.zip", "model.safetensors",
                                           "config.json")] == [True, True, True, False, False]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name):
            yield node.func.value.id, node.func.attr, node


def test_every_torch_load_passes_weights_only_and_nothing_unpickles():
    torch_loads, offenders = 0, []
    for folder in CODE:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for module, attr, call in _calls(tree):
                where = f"{path.relative_to(REPO_ROOT)}:{call.lineno}"
                if module == "torch" and attr == "load":
                    torch_loads += 1
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in call.keywords)
                    if not safe:
                        offenders.append(f"{where}: torch.load without weights_only=True")
                elif module in PICKLE_LOADERS and attr in ("load", "loads", "Unpickler"):
                    offenders.append(f"{where}: {module}.{attr}")
                elif attr == "load" and any(k.arg == "allow_pickle" and getattr(k.value, "value", None) is True
                                            for k in call.keywords):
                    offenders.append(f"{where}: {module}.load(allow_pickle=True)")
    assert torch_loads >= 2  # the hf backend's CPU data-parallel optimizer/scheduler restore
    assert not offenders, offenders
