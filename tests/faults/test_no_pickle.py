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
    assert {a["name"] for a in arts} >= {"adapter", "merged_model", "eval_metrics", "train_split", "training_plan"}
    for art in arts:
        assert "load_error" not in art, art
        source = art["materializer"]
        assert source.startswith("materializers.") or source in ZENML_PLAIN, (art["name"], source)
        for root, _, files in os.walk(art["uri"]):
            for name in files:
                head = (Path(root) / name).read_bytes()[:2]
                # a pickle stream starts with PROTO (0x80) and a protocol number 2..5
                assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), \
                    (art["name"], name)


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
