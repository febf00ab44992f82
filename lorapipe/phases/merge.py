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
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

from pydantic import BaseModel

from lorapipe.backends import backend_spec, get_backend
from lorapipe.backends.base import read_adapter_metadata
from lorapipe.backends.peft_adapter import release_memory
from lorapipe.data.dataset import ConversationDataset
from lorapipe.config import shard_bytes  # noqa: F401  (re-exported: callers import it from here)
from lorapipe.hardware.plan import PhasePlan

MERGE_METADATA = "lorapipe_merge.json"
# PEFT: reference and merged model run in the same dtype, so logits differ by the rounding of W + BA to it only.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}
_COMPARE_POSITIONS = 32  # logits compared per slice


class MergeCheckFailed(RuntimeError):
    """The merged model's logits differ from base+adapter beyond the tolerance: it is not registered."""


class MergeCheck(BaseModel):
    dtype: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tolerance: float
    passed: bool
    rows_checked: int
    greedy_agreement: float = 1.0  # share of positions where merged and base+adapter pick the same argmax token
    positions_checked: int = 0
    memory_gb: float = 0.0  # the merge's peak: CUDA's allocated peak, the process's resident high-water mark on CPU
    memory_at_start_gb: Optional[float] = None  # what the process held when the merge began

    def require_passed(self) -> None:
        if not self.passed:
            raise MergeCheckFailed(
                f"the merged model's logits differ from base+adapter by up to {self.max_abs_logit_diff:.3g} (mean "
                f"{self.mean_abs_logit_diff:.3g}, greedy agreement {self.greedy_agreement:.1%}), above the tolerance "
                f"{self.tolerance:.3g} for {self.dtype} on {self.rows_checked} rows; the merged weights are wrong or "
                f"too coarse: try merge.dtype: float32, or raise merge.logits_atol if the difference is rounding")


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


class ReferenceLogits:
    """The check's reference logits, kept on disk (one safetensors file a row) and read back a slice of positions at
    a time: on a small model with a large vocabulary they are no small thing (Qwen2.5-0.5B, 152k tokens: 4 rows of
    256 positions are 0.3 GB in bf16, a third of the model), and in memory they would sit beside it all along."""

    def __init__(self, folder: Path):
        self.folder, self.rows = folder, 0

    def keep(self, logits: Any) -> None:
        """`logits`: [1, positions, vocab] of one row, in the model's own dtype."""
        from safetensors.torch import save_file

        save_file({"logits": logits[0].contiguous()}, str(self.folder / f"row-{self.rows}.safetensors"))
        self.rows += 1

    def slices(self, row: int, positions: int) -> Iterator[Any]:
        """[positions, vocab] slices of row `row`, in order."""
        from safetensors import safe_open

        with safe_open(str(self.folder / f"row-{row}.safetensors"), framework="pt") as fh:
            logits = fh.get_slice("logits")
            for start in range(0, logits.get_shape()[0], positions):
                yield logits[start:start + positions]


def _clear_weights(out: Path) -> None:
    """Weights of an interrupted merge, or of this adapter merged with other settings: shards of another layout
    would stay beside the new ones (save_pretrained removes only its own numbered shards)."""
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / MERGE_METADATA]:
        stale.unlink(missing_ok=True)


def _check_inputs(tokenizer: Any, rows: list, max_length: int, classifying: bool = False) -> list[Any]:
    import torch

    from lorapipe.data.render import encode

    if classifying:  # a classifier's row: the text (and pair) encoded as training encoded it
        return [dict(tokenizer(rec.text, rec.text_pair, truncation=True, max_length=max_length, return_tensors="pt"))
                for rec in rows]
    return [torch.tensor([encode(tokenizer, rec, max_length).input_ids]) for rec in rows]


def write_generation_config(out: Path, tokenizer: Any) -> list[int]:
    """generation_config.json with `eos_token_id` listing every end token, so `generate` (and anything that reads
    the file) stops at the template's turn end as well as at EOS."""
    from transformers import AutoConfig, GenerationConfig

    from lorapipe.models.end_tokens import end_token_ids

    ends = end_token_ids(tokenizer)
    try:
        config = GenerationConfig.from_pretrained(str(out))
    except OSError:  # the backend wrote none
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out)))
    config.eos_token_id = ends
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(str(out))
    return ends


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


def compare_with_reference(out_dir: str | Path, inputs: list[Any], reference: ReferenceLogits, phase: PhasePlan,
                           tolerance: float) -> MergeCheck:
    """Reload the saved folder in the merge dtype and compare its logits with the reference: max and mean absolute
    difference, and how often both pick the same greedy token."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorapipe.models.loading import torch_dtype

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch_dtype(phase.dtype)).to(phase.device)
    reloaded.eval()
    max_diff, diff_sum, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for row, ids in enumerate(inputs):
            got = reloaded(input_ids=ids.to(phase.device), use_cache=False).logits.cpu()
            # a few positions at a time: float32 copies of whole [positions x vocab] logits would cost more than
            # the logits themselves
            for start, ref in zip(range(0, got.shape[1], _COMPARE_POSITIONS),
                                  reference.slices(row, _COMPARE_POSITIONS)):
                r = ref.float()
                g = got[0, start:start + _COMPARE_POSITIONS].float()
                agree += int((r.argmax(-1) == g.argmax(-1)).sum())
                d = r.sub_(g).abs_()
                max_diff = max(max_diff, float(d.max()))
                diff_sum += float(d.sum()) / d.shape[1]
                positions += d.shape[0]
            del got
    del reloaded
    release_memory(phase.device)
    return MergeCheck(dtype=phase.dtype, max_abs_logit_diff=max_diff, mean_abs_logit_diff=diff_sum / positions,
                      tolerance=tolerance, passed=max_diff <= tolerance, rows_checked=len(inputs),
                      greedy_agreement=agree / positions, positions_checked=positions)


def compare_classifier(out_dir: str | Path, inputs: list[Any], reference: ReferenceLogits, phase: PhasePlan,
                       tolerance: float) -> MergeCheck:
    """A merged classifier reloaded with AutoModelForSequenceClassification: its label logits against the reference,
    and how often both pick the same label."""
    import torch

    from lorapipe.backends.peft_adapter import forward_logits
    from lorapipe.models.loading import load_model

    reloaded = load_model(str(out_dir), phase.dtype, device=phase.device, task="classification").eval()
    max_diff, diff_sum, agree = 0.0, 0.0, 0
    with torch.no_grad():
        for row, enc in enumerate(inputs):
            got = forward_logits(reloaded, enc).float().cpu()[0]
            ref = next(reference.slices(row, got.shape[0])).float()
            agree += int(ref.argmax() == got.argmax())
            d = (ref - got).abs()
            max_diff = max(max_diff, float(d.max()))
            diff_sum += float(d.mean())
    del reloaded
    release_memory(phase.device)
    return MergeCheck(dtype=phase.dtype, max_abs_logit_diff=max_diff, mean_abs_logit_diff=diff_sum / len(inputs),
                      tolerance=tolerance, passed=max_diff <= tolerance, rows_checked=len(inputs),
                      greedy_agreement=agree / len(inputs), positions_checked=len(inputs))


def merge_adapter(adapter_dir: str, out_dir: str, check_rows: ConversationDataset, phase: PhasePlan,
                  check_samples: int = 4, atol: Optional[float] = None, max_length: int = 256,
                  max_shard_size: str = "2GB",
                  before_check: Optional[Callable[[Path], None]] = None) -> MergeCheck:
    """Merge (PEFT) or fuse (mlx-lm) the adapter with the backend that trained it, on the merge phase's device and in
    its dtype, into `out_dir`; reload the saved folder and compare it with base + adapter on `check_samples` rows.

    A folder that already holds a passed merge of the same adapter (same weights, base, dtype and shard size) is
    left as it is: the recorded check is returned. A folder holding another merge is refused, never overwritten.

    Args:
        adapter_dir: the adapter folder (its `lorapipe_adapter.json` names base model and backend).
        out_dir: where the merged folder is written (created if missing).
        check_rows: held-out rows (the test split); the first `check_samples` are compared.
        phase: the merge plan: device and the merged weights' dtype.
        check_samples: rows compared.
        atol: the largest allowed absolute logit difference; None: by dtype (DEFAULT_ATOL).
        max_length: tokens per compared row.
        max_shard_size: the largest safetensors shard, e.g. "2GB".
        before_check: called with the saved folder before it is reloaded (tests corrupt a shard here).

    Returns:
        The check; `check.require_passed()` raises MergeCheckFailed when it failed.
    """
    from lorapipe.export.model_card import model_card, write_model_card
    from lorapipe.export.modelfile import write_modelfile
    from lorapipe.models.end_tokens import end_tokens
    from lorapipe.models.loading import load_tokenizer
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
            print(f"{out} is already merged (adapter {fingerprint[:12]}, {phase.dtype}); nothing to do", flush=True)
            return MergeCheck(**record["check"])
        if record.get("settings", {}).get("adapter_fingerprint") != fingerprint:
            raise FileExistsError(f"{out} holds the merge of another adapter ({MERGE_METADATA}: adapter "
                                  f"{str(record.get('settings', {}).get('adapter_fingerprint'))[:12]}, this one "
                                  f"{fingerprint[:12]}); choose an empty folder or delete it")
        print(f"{out} holds a merge of this adapter with other settings or a failed check: merging again", flush=True)
    rows = check_rows.records[:check_samples]
    if not rows:
        raise ValueError("no rows to check the merge on: the test split is empty (split.test_fraction)")
    out.mkdir(parents=True, exist_ok=True)
    _clear_weights(out)
    backend = meta["plan"]["backend"]
    classifying = meta.get("task") == "classification"  # a sequence classifier: label logits, no generation
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code=meta.get("trust_remote_code", False),
                               chat_template=meta.get("chat_template_override"))
    inputs = _check_inputs(tokenizer, rows, max_length, classifying)
    # beside the output, on the filesystem that has room for the model anyway (/tmp may be memory)
    with PhaseMemory(phase.device) as memory, \
            tempfile.TemporaryDirectory(prefix=".lorapipe-merge-check-", dir=out.parent) as scratch:
        reference = ReferenceLogits(Path(scratch))
        # a full disk: one error naming the folder, the model's size and the space free there; partial shards removed
        with merged_model_write(out, lambda: merged_model_bytes(meta, phase.dtype), lambda: _clear_weights(out)):
            _reference_then_merge(backend, adapter_dir, out, phase, inputs, reference, shard_bytes(max_shard_size))
            tokenizer.save_pretrained(str(out))  # with the chat template training used
            if not classifying:
                write_generation_config(out, tokenizer)
        if before_check is not None:
            before_check(out)
        tol = atol if atol is not None else DEFAULT_ATOL[phase.dtype]
        check = (compare_classifier if classifying else compare_with_reference)(out, inputs, reference, phase, tol)
    check.memory_gb = memory.gb
    check.memory_at_start_gb = memory.start_gb
    print(f"merge check: max |logit diff| {check.max_abs_logit_diff:.3g}, mean {check.mean_abs_logit_diff:.3g}, "
          f"greedy agreement {check.greedy_agreement:.1%} over {check.positions_checked} positions "
          f"(tolerance {check.tolerance:.3g}, {check.dtype}): {'passed' if check.passed else 'FAILED'}", flush=True)

    if classifying:  # Ollama serves generation, not classifiers: no Modelfile
        ends = []
        modelfile = SimpleNamespace(family=None, note="a sequence classifier: Ollama serves text generation")
    else:
        ends = end_tokens(tokenizer)
        modelfile = write_modelfile(out, tokenizer, ends)
        if modelfile.family is None:
            print(f"Ollama Modelfile written without TEMPLATE: {modelfile.note}", flush=True)
    files = sorted({p.name for p in out.iterdir()} | {"README.md", MERGE_METADATA})
    write_model_card(out, model_card(meta, check.model_dump(), test_rows=len(check_rows),
                                     adapter_fingerprint=fingerprint, ollama_family=modelfile.family,
                                     ollama_note=modelfile.note, files=files))
    (out / MERGE_METADATA).write_text(json.dumps({
        "adapter_metadata": meta, "settings": settings, "check": check.model_dump(), "end_tokens": ends,
        "ollama": {"family": modelfile.family, "note": modelfile.note}}, indent=2))
    return check
