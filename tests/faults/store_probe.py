"""Read a ZenML store back and print what the fault tests check, as one JSON line:
`python -m tests.faults.store_probe MODEL_NAME` (the store is the one ZENML_CONFIG_PATH names).

For the newest run and the model version it registered: every output artifact version loaded through its
materializer (what loaded, or the error), the materializer and data type sources, every weights/JSON file under its
URI parsed, and the run metadata of the run, its steps, its artifacts and the model version (JSON text). For the whole
store: every run with its status and step statuses, and the folders under the artifact store's step outputs that no
artifact version points to (what a killed step leaves behind).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _dump(value) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def _file_problem(path: Path) -> str | None:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy"):
                pass
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _artifact(step: str, name: str, art) -> dict:
    entry = {"step": step, "name": name, "id": str(art.id), "uri": art.uri,
             "materializer": art.materializer.import_path, "data_type": art.data_type.import_path,
             "run_metadata": _dump(art.run_metadata)}
    try:
        loaded = art.load()
        entry["loaded"] = f"{type(loaded).__module__}.{type(loaded).__qualname__}"
    except Exception as exc:  # noqa: BLE001
        entry["load_error"] = f"{type(exc).__name__}: {exc}"
    bad = {}
    for root, _, files in os.walk(art.uri):
        for f in files:
            problem = _file_problem(Path(root) / f)
            if problem:
                bad[str(Path(root) / f)] = problem
    entry["unreadable_files"] = bad
    return entry


def main(model_name: str) -> None:
    from zenml.client import Client

    client = Client()
    runs = client.list_pipeline_runs(sort_by="desc:created", size=50).items
    out: dict = {"runs": [{"name": r.name, "status": str(r.status).split(".")[-1].lower(),
                           "steps": {n: str(s.status).split(".")[-1].lower() for n, s in r.steps.items()}}
                          for r in runs]}
    last = runs[0]
    out["env_has_secrets"] = all(os.environ.get(n) for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"))
    out["run_metadata"] = _dump(last.run_metadata)
    out["step_metadata"] = {n: _dump(s.run_metadata) for n, s in last.steps.items()}
    out["artifacts"] = [_artifact(n, name, art) for n, s in last.steps.items()
                        for name, versions in s.outputs.items() for art in versions]
    mv = client.get_model_version(model_name, last.model_version.name)
    out["model_version"] = {"name": mv.name, "run_metadata": _dump(mv.run_metadata)}
    linked = [a for group in (mv.data_artifacts, mv.model_artifacts, mv.deployment_artifacts)
              for versions in group.values() for a in versions.values()]
    out["model_version"]["artifacts"] = [_artifact("model_version", a.name, a) for a in linked]
    # every artifact version the store holds (the killed runs' included), and the folders nothing points to
    uris = {a.uri for a in client.list_artifact_versions(size=1000).items}
    out["artifact_versions"] = len(uris)
    store_root = Path(client.active_stack.artifact_store.path)
    orphans = []
    for step_dir in store_root.iterdir():
        if not step_dir.is_dir() or step_dir.name == "logs":
            continue
        for output_dir in step_dir.iterdir():
            for uri in (p for p in output_dir.glob("*/*") if p.is_dir()):
                if str(uri) not in uris:
                    orphans.append(str(uri))
    out["orphan_folders"] = orphans
    out["artifact_store"] = str(store_root)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
