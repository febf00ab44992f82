"""Merge a LoRA adapter into a 16-bit copy of its base, save it, reload it and prove the logits match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from lorapipe.backends.base import read_adapter_metadata
from lorapipe.data.dataset import ConversationDataset

MERGE_METADATA = "lorapipe_merge.json"
# Logits differ between merged and base+adapter by rounding only; the tolerance follows the saved dtype.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}


class MergeCheck(BaseModel):
    dtype: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tolerance: float
    passed: bool
    rows_checked: int


def merge_adapter(adapter_dir: str, out_dir: str, check_rows: ConversationDataset, dtype: str = "bfloat16",
                  check_samples: int = 4, atol: Optional[float] = None, max_length: int = 256) -> MergeCheck:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorapipe.data.render import encode
    from lorapipe.models.loading import load_model, load_tokenizer, torch_dtype

    meta = read_adapter_metadata(adapter_dir)
    base_name, revision = meta["base_model"], meta.get("base_revision")
    out = Path(out_dir)
    if (out / MERGE_METADATA).exists():
        print(f"{out} is already merged; nothing to do")
        return MergeCheck(**json.loads((out / MERGE_METADATA).read_text())["check"])
    tokenizer = load_tokenizer(adapter_dir, chat_template=meta.get("chat_template_override"))
    merged = PeftModel.from_pretrained(load_model(base_name, dtype, revision), adapter_dir).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    del merged

    # reference: base + adapter in float32; candidate: the saved merged model reloaded as written
    reference = PeftModel.from_pretrained(load_model(base_name, "float32", revision), adapter_dir).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch_dtype(dtype)).eval()
    rows = check_rows.records[:check_samples]
    if not rows:
        raise ValueError("no rows to check the merge on")
    max_diff, diffs = 0.0, []
    with torch.no_grad():
        for rec in rows:
            ids = torch.tensor([encode(tokenizer, rec, max_length).input_ids])
            a = reference(input_ids=ids).logits.float()
            b = reloaded(input_ids=ids).logits.float()
            d = (a - b).abs()
            max_diff = max(max_diff, float(d.max()))
            diffs.append(float(d.mean()))
    tol = atol if atol is not None else DEFAULT_ATOL[dtype]
    check = MergeCheck(dtype=dtype, max_abs_logit_diff=max_diff, mean_abs_logit_diff=sum(diffs) / len(diffs),
                       tolerance=tol, passed=max_diff <= tol, rows_checked=len(rows))
    (out / MERGE_METADATA).write_text(json.dumps({"adapter_metadata": meta, "check": check.model_dump()}, indent=2))
    return check
