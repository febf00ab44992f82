"""Using a PEFT adapter folder after training, whichever TRL backend (hf, unsloth) wrote it: score it against its
base, merge it, and compute the unmerged reference logits the merge check compares with."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from lorapipe.backends.base import read_adapter_metadata
from lorapipe.hardware.plan import PhasePlan


def _base(meta: dict, dtype: str, device: str) -> Any:
    from lorapipe.models.loading import load_model

    return load_model(meta["base_model"], dtype, meta.get("base_revision"), meta.get("trust_remote_code", False),
                      device=device)


def eval_models(adapter_dir: str, phase: PhasePlan) -> dict[str, Callable[[], Any]]:
    """One loaded base with the adapter on; "base" is the same model with the adapter switched off."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(read_adapter_metadata(adapter_dir), phase.dtype, phase.device), adapter_dir)

    @contextlib.contextmanager
    def base() -> Iterator[Any]:
        with model.disable_adapter():
            yield model

    return {"base": base, "tuned": lambda: contextlib.nullcontext(model)}


def merge(adapter_dir: str, out_dir: str, phase: PhasePlan) -> None:
    from peft import PeftModel

    from lorapipe.models.loading import load_tokenizer

    meta = read_adapter_metadata(adapter_dir)
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code=meta.get("trust_remote_code", False),
                               chat_template=meta.get("chat_template_override"))
    merged = PeftModel.from_pretrained(_base(meta, phase.dtype, phase.device), adapter_dir).merge_and_unload()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def reference_logits(adapter_dir: str, phase: PhasePlan) -> Callable[[Any], Any]:
    """ids -> float32 logits of base + adapter, unmerged, on the merge phase's device."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(read_adapter_metadata(adapter_dir), "float32", phase.device),
                                      adapter_dir).eval()
    return lambda ids: model(input_ids=ids.to(phase.device)).logits.float().cpu()
