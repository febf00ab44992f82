"""Merge a LoRA adapter into a 16-bit copy of its base, save it, reload it and prove it equals base + adapter.

One copy of the model at a time: the reference logits of the few check rows are computed with base + adapter
*before* the merge (PEFT merges in place on that same model object) and set aside on disk, the merged model is saved
as sharded safetensors and freed, then the saved folder is reloaded and compared with them. The folder describes
itself: tokenizer and chat template, `generation_config.json` listing every end token, a model card (README.md), an
Ollama Modelfile, and `lorapipe_merge.json` (adapter metadata, adapter fingerprint, the check), written last so it
marks a complete merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from lorapipe import short_lived
from lorapipe.backends import backend_spec, get_backend
from lorapipe.backends.peft_adapter import release_memory
from lorapipe.config import shard_bytes
from lorapipe.data.dataset import ConversationDataset
from lorapipe.evaluation.merge_check import (
    DEFAULT_ATOL,
    MergeCheck,
    MergeCheckFailed,
    ReferenceLogits,
)
from lorapipe.hardware.plan import PhasePlan
from lorapipe.tasks import get_task
from lorapipe.training.adapter import read_adapter_metadata, task_of

log = logging.getLogger(__name__)

MERGE_METADATA = "lorapipe_merge.json"
__all__ = ["MERGE_METADATA", "MergeCheck", "MergeCheckFailed", "adapter_fingerprint", "merge_adapter",
           "read_merge_record"]


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """sha256 of the adapter's weights and config (`adapter*` files: PEFT's and mlx-lm's alike), the files that,
    with the base model, decide the merged weights; a fully fine-tuned classifier's own weights and config
    (`model*.safetensors`, `config.json`), which are the merged weights."""
    digest = hashlib.sha256()
    folder = Path(adapter_dir)
    whole = [*folder.glob("model*.safetensors"), folder / "config.json"] if (folder / "model.safetensors").is_file() \
        or (folder / "model.safetensors.index.json").is_file() else []
    for path in sorted([*folder.glob("adapter*"), *whole]):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def read_merge_record(out_dir: str | Path) -> Optional[dict]:
    path = Path(out_dir) / MERGE_METADATA
    return json.loads(path.read_text()) if path.exists() else None


def _clear_weights(out: Path) -> None:
    """Weights of an interrupted merge, or of this adapter merged with other settings: shards of another layout
    would stay beside the new ones (save_pretrained removes only its own numbered shards)."""
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / MERGE_METADATA]:
        stale.unlink(missing_ok=True)


def _reference_then_merge(backend_name: str, adapter_dir: str, out: Path, phase: PhasePlan, inputs: list[Any],
                          reference: ReferenceLogits, max_shard_size: int) -> None:
    """Reference logits of `inputs` (base + adapter, unmerged) into `reference`, then the merged folder; one model
    alive at a time."""
    if backend_spec(backend_name).adapter_format == "peft":
        from lorapipe.backends.peft_adapter import merge_with_reference

        merge_with_reference(adapter_dir, str(out), phase, inputs, reference.keep, max_shard_size)
        return
    # other formats (mlx-lm): the backend's own reference first, its model dropped before the fuse
    import torch

    backend = get_backend(backend_name)
    forward = backend.reference_logits(adapter_dir, phase)
    with torch.no_grad():
        for ids in inputs:
            reference.keep(forward(ids))
    del forward
    release_memory(phase.device)
    backend.merge(adapter_dir, str(out), phase)


def merge_adapter(adapter_dir: str, out_dir: str, check_rows: ConversationDataset, phase: PhasePlan,
                  check_samples: int = 4, atol: Optional[float] = None, max_shard_size: str = "2GB",
                  before_check: Optional[Callable[[Path], None]] = None, parity_samples: int = 0,
                  parity_max_new_tokens: int = 16) -> MergeCheck:
    """Merge (PEFT) or fuse (mlx-lm) the adapter with the backend that trained it, on the merge phase's device and in
    its dtype, into `out_dir`; reload the saved folder and compare it with base + adapter on `check_samples` rows.

    A folder that already holds a passed merge of the same adapter (same weights, base, dtype and shard size) is
    left as it is: the recorded check is returned. A folder holding another merge is refused, never overwritten.

    Args:
        adapter_dir: the adapter folder (its `lorapipe_adapter.json` names base model and backend).
        out_dir: where the merged folder is written (created if missing).
        check_rows: held-out rows (the test split); the first `check_samples` are compared.
        phase: the merge plan: device, the merged weights' dtype and the tokens per compared row.
        check_samples: rows compared.
        atol: the largest allowed absolute logit difference; None: by dtype (DEFAULT_ATOL).
        max_shard_size: the largest safetensors shard, e.g. "2GB".
        before_check: called with the saved folder before it is reloaded (tests corrupt a shard here).
        parity_samples: test prompts answered greedily by base+adapter and by the saved folder as served
            (`lorapipe.phases.parity`), for a task that generates; 0: none.
        parity_max_new_tokens: tokens generated per parity prompt.

    Returns:
        The check; `check.require_passed()` raises MergeCheckFailed when it failed.
    """
    short_lived.freeze_training_imports()  # no-op unless this process runs one command and ends
    from lorapipe.export.model_card import model_card, write_model_card
    from lorapipe.models.loading import load_tokenizer, save_tokenizer
    from lorapipe.training.disk import merged_model_bytes, merged_model_write
    from lorapipe.training.monitoring import PhaseMemory

    meta = read_adapter_metadata(adapter_dir)
    out = Path(out_dir)
    fingerprint = adapter_fingerprint(adapter_dir)
    settings = {"adapter_fingerprint": fingerprint, "base_model": meta["base_model"],
                "base_revision": meta.get("base_revision"), "dtype": phase.dtype, "max_shard_size": max_shard_size}
    record = read_merge_record(out)
    if record is not None:
        if record.get("settings") == settings and record["check"]["passed"]:
            log.info("%s is already merged (adapter %s, %s); nothing to do", out, fingerprint[:12], phase.dtype)
            return MergeCheck(**record["check"])
        if record.get("settings", {}).get("adapter_fingerprint") != fingerprint:
            raise FileExistsError(f"{out} holds the merge of another adapter ({MERGE_METADATA}: adapter "
                                  f"{str(record.get('settings', {}).get('adapter_fingerprint'))[:12]}, this one "
                                  f"{fingerprint[:12]}); choose an empty folder or delete it")
        log.info("%s holds a merge of this adapter with other settings or a failed check: merging again", out)
    rows = check_rows.records[:check_samples]
    if not rows:
        raise ValueError("no rows to check the merge on: the test split is empty (split.test_fraction)")
    out.mkdir(parents=True, exist_ok=True)
    _clear_weights(out)
    backend = meta["plan"]["backend"]
    task = get_task(task_of(meta))  # what a check row is, and how its logits compare
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code=meta.get("trust_remote_code", False),
                               chat_template=meta.get("chat_template_override"))
    inputs = task.check_inputs(tokenizer, rows, phase.max_seq_length)
    # beside the output, on the filesystem that has room for the model anyway (/tmp may be memory)
    with PhaseMemory(phase.device) as memory, \
            tempfile.TemporaryDirectory(prefix=".lorapipe-merge-check-", dir=out.parent) as scratch:
        reference = ReferenceLogits(Path(scratch))
        # a full disk: one error naming the folder, the model's size and the space free there; partial shards removed
        with merged_model_write(out, lambda: merged_model_bytes(meta, phase.dtype), lambda: _clear_weights(out)):
            _reference_then_merge(backend, adapter_dir, out, phase, inputs, reference, shard_bytes(max_shard_size))
            save_tokenizer(tokenizer, out)  # with the chat template and its switches training used
            ends, ollama_family, ollama_note = task.serving_files(out, tokenizer)
        if before_check is not None:
            before_check(out)
        tol = atol if atol is not None else DEFAULT_ATOL[phase.dtype]
        check = task.compare_merged(out, inputs, reference, phase, tol)
        if parity_samples and task.spec.generates and check.passed:
            from lorapipe.phases.parity import serving_parity

            parity = serving_parity(adapter_dir, str(out), check_rows.records, phase, parity_samples,
                                    parity_max_new_tokens, tol)
            check.serving_parity = parity.model_dump()
            log.info("serving parity (%d prompts, greedy, %d tokens): %s: %s", parity.prompts,
                     parity.max_new_tokens, "passed" if parity.passed else "FAILED", parity.reason)
    check.memory_gib = memory.peak_gib
    check.memory_at_start_gib = memory.start_gib
    log.info("merge check: max |logit diff| %.3g, mean %.3g, greedy agreement %.1f%% over %d positions (tolerance "
             "%.3g, %s): %s", check.max_abs_logit_diff, check.mean_abs_logit_diff, check.greedy_agreement * 100,
             check.positions_checked, check.tolerance, check.dtype, "passed" if check.passed else "FAILED")
    files = sorted({p.name for p in out.iterdir()} | {"README.md", MERGE_METADATA})
    write_model_card(out, model_card(meta, check.model_dump(), test_rows=len(check_rows),
                                     adapter_fingerprint=fingerprint, ollama_family=ollama_family,
                                     ollama_note=ollama_note, files=files))
    (out / MERGE_METADATA).write_text(json.dumps({
        "adapter_metadata": meta, "settings": settings, "check": check.model_dump(), "end_tokens": ends,
        "ollama": {"family": ollama_family, "note": ollama_note}}, indent=2))
    return check
