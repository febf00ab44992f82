"""Merge a LoRA adapter into a 16-bit copy of its base, save it, reload it and prove the logits match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from lorapipe.backends import get_backend
from lorapipe.backends.base import read_adapter_metadata
from lorapipe.data.dataset import ConversationDataset
from lorapipe.hardware.plan import PhasePlan

MERGE_METADATA = "lorapipe_merge.json"
# Logits differ between merged and base+adapter by rounding only; the tolerance follows the saved dtype.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}


class MergeCheckFailed(RuntimeError):
    """The merged model's logits differ from base+adapter beyond the tolerance: it is not registered."""


class MergeCheck(BaseModel):
    dtype: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tolerance: float
    passed: bool
    rows_checked: int
    memory_gb: float = 0.0  # the merge's own peak on CUDA (counter reset first), the process RSS on CPU


def merge_adapter(adapter_dir: str, out_dir: str, check_rows: ConversationDataset, phase: PhasePlan,
                  check_samples: int = 4, atol: Optional[float] = None, max_length: int = 256) -> MergeCheck:
    """Merge (PEFT) or fuse (mlx-lm) the adapter with the backend that trained it, on the merge phase's device and
    in its dtype, reload the saved folder and compare its logits with base+adapter, unmerged."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorapipe.data.render import encode
    from lorapipe.models.loading import load_tokenizer, torch_dtype
    from lorapipe.training.monitoring import PhaseMemory

    meta = read_adapter_metadata(adapter_dir)
    out = Path(out_dir)
    if (out / MERGE_METADATA).exists():
        print(f"{out} is already merged; nothing to do")
        return MergeCheck(**json.loads((out / MERGE_METADATA).read_text())["check"])
    rows = check_rows.records[:check_samples]
    if not rows:
        raise ValueError("no rows to check the merge on")
    backend = get_backend(meta["plan"]["backend"])  # the metadata read above names it
    dtype = phase.dtype
    with PhaseMemory(phase.device) as memory:
        backend.merge(adapter_dir, str(out), phase)
        tokenizer = load_tokenizer(str(out), chat_template=meta.get("chat_template_override"))
        reference = backend.reference_logits(adapter_dir, phase)
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch_dtype(dtype)).to(phase.device).eval()
        max_diff, diffs = 0.0, []
        with torch.no_grad():
            for rec in rows:
                ids = torch.tensor([encode(tokenizer, rec, max_length).input_ids])
                d = (reference(ids) - reloaded(input_ids=ids.to(phase.device)).logits.float().cpu()).abs()
                max_diff = max(max_diff, float(d.max()))
                diffs.append(float(d.mean()))
        del reference, reloaded
    tol = atol if atol is not None else DEFAULT_ATOL[dtype]
    check = MergeCheck(dtype=dtype, max_abs_logit_diff=max_diff, mean_abs_logit_diff=sum(diffs) / len(diffs),
                       tolerance=tol, passed=max_diff <= tol, rows_checked=len(rows), memory_gb=memory.gb)
    (out / MERGE_METADATA).write_text(json.dumps({"adapter_metadata": meta, "check": check.model_dump()}, indent=2))
    return check
