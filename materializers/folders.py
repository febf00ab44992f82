"""Folder artifacts (adapter, merged model) stored file by file: safetensors, JSON, tokenizer files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from lorapipe.artifacts import ADAPTER_PLOTS, AdapterFolder, FolderArtifact, ModelFolder


def _copy_tree(src: str, dst: str) -> None:
    fileio.makedirs(dst)
    for name in fileio.listdir(src):
        name = name.decode() if isinstance(name, bytes) else name
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if fileio.isdir(s):
            _copy_tree(s, d)
        else:
            fileio.copy(s, d, overwrite=True)


def training_summary_html(meta: dict) -> str:
    """What trained, how fast, and the memory the plan estimated against what training measured."""
    from lorapipe import html_report as h

    result, plan = meta.get("result", {}), meta.get("plan", {})
    memory = plan.get("memory", {})
    device = result.get("device", plan.get("device"))
    measured = result.get("peak_memory_gib")
    measured_what = ("peak allocated CUDA memory of one process" if device == "cuda" else
                     "peak of mlx's allocator" if result.get("backend") == "mlx" else
                     "resident memory of the process (includes the Python and torch runtime)")
    return h.page(
        "Training",
        h.key_values([("base model", meta.get("base_model")), ("backend", result.get("backend")),
                      ("device", device), ("dtype", plan.get("dtype")), ("quantization", plan.get("quantization")),
                      ("processes", result.get("world_size", plan.get("world_size", 1))),
                      ("steps", result.get("steps")), ("train loss", result.get("train_loss")),
                      ("tokens trained", result.get("train_tokens")),
                      ("tokens/s", result.get("tokens_per_second")), ("seconds", result.get("train_seconds")),
                      ("resumed from", result.get("resumed_from") or "no checkpoint")]),
        h.section("Memory: planned vs measured", h.table(
            ["", "GiB"],
            [("planned: weights", memory.get("weights_gib")),
             ("planned: LoRA + optimizer", memory.get("lora_and_optimizer_gib")),
             ("planned: activations", memory.get("activations_gib")),
             ("planned: total", memory.get("total_gib")), ("budget", memory.get("budget_gib")),
             (f"measured: {measured_what}", measured)])))


def stored_folder(uri: str) -> str:
    """Where a folder artifact's files live inside its artifact URI."""
    return os.path.join(uri, _FolderMaterializer.FOLDER)


def _move_tree(src: str, dst: str) -> None:
    """Move file by file: a rename on one filesystem; across filesystems each file is copied then deleted, so at
    most one file exists twice at any moment."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s):
            _move_tree(s, d)
        else:
            shutil.move(s, d)
    os.rmdir(src)


class _FolderMaterializer(BaseMaterializer):
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (FolderArtifact,)
    FOLDER: ClassVar[str] = "folder"

    def load(self, data_type: Type[Any]) -> Any:
        remote = stored_folder(self.uri)
        if os.path.isdir(remote):  # local artifact store: use the stored folder in place
            return data_type.from_folder(remote)
        with self.get_temporary_directory(delete_at_exit=False) as tmp:
            _copy_tree(remote, tmp)
            return data_type.from_folder(tmp)

    def save(self, data: FolderArtifact) -> None:
        """Store the folder as `<uri>/folder`, holding one copy of a large temporary folder at most:

        - already there (the merge step wrote into the store's folder): nothing to do;
        - a temporary folder and a local store: moved in, file by file;
        - otherwise copied (uploaded, for a remote store); a temporary source is removed once the step has ended,
          after ZenML has read metadata and views (outside a step the caller keeps it).
        """
        stored = stored_folder(self.uri)
        if os.path.isdir(stored) and os.path.samefile(data.path, stored):
            return
        if data.temporary and os.path.isdir(self.uri):
            _move_tree(data.path, stored)
            data.path = stored
            return
        _copy_tree(data.path, stored)
        if data.temporary:
            self._register_directory_for_deletion_after_step_execution(data.path)

    def stored_files(self) -> list[str]:
        """The files of the stored copy (the source folder may be gone, or elsewhere, when ZenML asks)."""
        stored = stored_folder(self.uri)
        return sorted(n.decode() if isinstance(n, bytes) else n for n in fileio.listdir(stored))

    def extract_metadata(self, data: FolderArtifact) -> Dict[str, Any]:
        return {"files": ", ".join(self.stored_files())[:1000]}


class AdapterFolderMaterializer(_FolderMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (AdapterFolder,)

    def save_visualizations(self, data: AdapterFolder) -> Dict[str, VisualizationType]:
        """A training summary with the planned memory beside the measured peak, then the training monitor's plots
        (loss, learning rate, memory), already copied into the store with the folder."""
        stored = os.path.join(self.uri, self.FOLDER)
        path = os.path.join(self.uri, "training.html")
        with fileio.open(path, "w") as fh:
            fh.write(training_summary_html(data.metadata))
        views = {path: VisualizationType.HTML}
        views.update({os.path.join(stored, name): VisualizationType.IMAGE
                      for name in ADAPTER_PLOTS if (Path(data.path) / name).exists()})
        return views

    def extract_metadata(self, data: AdapterFolder) -> Dict[str, Any]:
        meta = super().extract_metadata(data)
        m = data.metadata
        meta.update({"base_model": m.get("base_model", ""), "data_fingerprint": m.get("data_fingerprint", ""),
                     "backend": m.get("result", {}).get("backend", "")})
        return meta


class ModelFolderMaterializer(_FolderMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (ModelFolder,)

    def extract_metadata(self, data: ModelFolder) -> Dict[str, Any]:
        meta = super().extract_metadata(data)
        check = data.metadata.get("check", {})
        meta.update({k: check[k] for k in ("dtype", "max_abs_logit_diff", "mean_abs_logit_diff", "greedy_agreement",
                                           "tolerance", "passed", "rows_checked") if k in check})
        meta["weight_shards"] = sum(1 for f in self.stored_files() if f.endswith(".safetensors"))
        meta["ollama_template"] = (data.metadata.get("ollama") or {}).get("family") or "none"
        meta["task"] = data.metadata.get("adapter_metadata", {}).get("task", "sft")
        return meta

    def save_visualizations(self, data: ModelFolder) -> Dict[str, VisualizationType]:
        """The merge check (merged vs base + adapter logits) and what the folder holds."""
        from lorapipe import html_report as h

        check = data.metadata.get("check", {})
        adapter = data.metadata.get("adapter_metadata", {})
        settings = data.metadata.get("settings", {})
        ollama = data.metadata.get("ollama") or {}
        body = h.page(
            "Merged model",
            h.paragraph("merge check passed" if check.get("passed") else "merge check FAILED",
                        "ok" if check.get("passed") else "bad"),
            h.key_values([("base model", adapter.get("base_model")), ("dtype", check.get("dtype")),
                          ("max |logit diff|", check.get("max_abs_logit_diff")),
                          ("mean |logit diff|", check.get("mean_abs_logit_diff")),
                          ("greedy-token agreement", check.get("greedy_agreement")),
                          ("tolerance", check.get("tolerance")), ("rows checked", check.get("rows_checked")),
                          ("positions checked", check.get("positions_checked")),
                          ("adapter sha256", settings.get("adapter_fingerprint")),
                          ("max shard size", settings.get("max_shard_size")),
                          ("Ollama TEMPLATE", ollama.get("family") or f"none: {ollama.get('note', '')}"),
                          ("merge memory (GiB)", check.get("memory_gib"))]),
            h.section("Files", h.table(["file"], [(f,) for f in self.stored_files()])))
        path = os.path.join(self.uri, "merge_check.html")
        with fileio.open(path, "w") as fh:
            fh.write(body)
        return {path: VisualizationType.HTML}
