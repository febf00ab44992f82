"""Using a PEFT adapter folder after training, whichever TRL backend (hf, unsloth) wrote it: score it against its
base, merge it, and compute the unmerged reference logits the merge check compares with."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from lorapipe.catalog import task_spec
from lorapipe.hardware.plan import PhasePlan
from lorapipe.training.adapter import read_adapter_metadata

log = logging.getLogger(__name__)


def trim_heap() -> None:
    """Have glibc give freed heap pages back to the OS: a model's small tensors and temporaries live in malloc's
    arenas, which otherwise keep their pages after they are freed, so the next allocation lands on top of them."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def release_memory(device: str) -> None:
    """Drop freed tensors for real: collect, empty CUDA's cache, trim the heap."""
    from lorapipe.training.monitoring import free_memory

    free_memory(device)
    trim_heap()


def load_base(meta: dict, dtype: str, device: str) -> Any:
    """The adapter's base as its task trains it (`TaskSpec.model_kind`): a causal LM, or a sequence classifier with
    the adapter's frozen labels, its head then replaced by the adapter's trained copy (modules_to_save)."""
    from lorapipe.models.loading import load_model
    from lorapipe.training.adapter import task_of

    kind = task_spec(task_of(meta)).model_kind
    model = load_model(meta["base_model"], dtype, meta.get("base_revision"), meta.get("trust_remote_code", False),
                       device=device, kind=kind, labels=meta.get("labels") if kind == "sequence_classifier" else None,
                       vocab_rows=meta.get("tokenizer_size"))
    if model.config.pad_token_id is None and meta.get("pad_token_id") is not None:
        model.config.pad_token_id = meta["pad_token_id"]
    return model


def forward_logits(model: Any, inputs: Any) -> Any:
    """Logits of one check input: token ids (a causal LM's [1, positions, vocab]) or a classifier's encoded row (a
    dict of tensors; [1, labels])."""
    if isinstance(inputs, dict):
        return model(**{k: v.to(model.device) for k, v in inputs.items()}).logits
    return model(input_ids=inputs.to(model.device), use_cache=False).logits


def eval_models(adapter_dir: str, phase: PhasePlan) -> dict[str, Callable[[], Any]]:
    """One loaded base with the adapter on; "base" is the same model with the adapter switched off."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(read_adapter_metadata(adapter_dir), phase.dtype, phase.device),
                                      adapter_dir)

    @contextlib.contextmanager
    def base() -> Iterator[Any]:
        with model.disable_adapter():
            yield model

    return {"base": base, "tuned": lambda: contextlib.nullcontext(model)}


def merge_with_reference(adapter_dir: str, out_dir: str, phase: PhasePlan, inputs: list[Any],
                         keep_reference: Callable[[Any], None], max_shard_size: int | str = "2GB") -> None:
    """Load the base in the merge dtype with the adapter on, hand the logits of each of `inputs` to `keep_reference`
    (the merge check's reference, in the model's own dtype), merge in place, save sharded safetensors into `out_dir`
    and free the model: one copy, held once.

    A QLoRA adapter is merged into the unquantised 16-bit base like any other: merging into 4-bit weights would
    round the adapter's update to 4-bit precision (peft warns about it, LLaMA-Factory refuses it).
    """
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    meta = read_adapter_metadata(adapter_dir)
    quantization = meta["plan"].get("quantization", "none")
    if quantization != "none":
        log.info("the adapter was trained on a %s-quantised base; merging into a %s copy of the unquantised base: "
                 "merged into quantised weights the adapter's update would lose its precision (peft warns, "
                 "LLaMA-Factory refuses)", quantization, phase.dtype)
    if meta.get("method") == "full":  # a fully fine-tuned classifier: nothing to fold in, written in the merge dtype
        from lorapipe.models.loading import load_model

        model = load_model(adapter_dir, phase.dtype, device=phase.device, kind="sequence_classifier").eval()
    else:
        model = PeftModel.from_pretrained(load_base(meta, phase.dtype, phase.device), adapter_dir).eval()
    with torch.no_grad():
        for ids in inputs:
            keep_reference(forward_logits(model, ids).cpu())
            trim_heap()  # the forward pass's activations
    release_memory(phase.device)
    if meta.get("method") == "full":
        merged = model
    else:
        # W += B A scale in place, one layer at a time with its temporaries given back before the next: in one
        # merge_and_unload() they pile up in malloc's arenas (~0.4 x the model on bench/merge_memory.py's 25M one)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
                trim_heap()
        # the LoRA layers dropped, the merged base layers kept (a classifier's head: its trained copy)
        merged = model.unload()
    del model
    release_memory(phase.device)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    del merged
    release_memory(phase.device)


def merge(adapter_dir: str, out_dir: str, phase: PhasePlan) -> None:
    """The backend interface's merge: weights and tokenizer, no check (lorapipe.phases.merge.merge_adapter checks)."""
    from lorapipe.models.loading import load_tokenizer

    meta = read_adapter_metadata(adapter_dir)
    merge_with_reference(adapter_dir, out_dir, phase, [], keep_reference=lambda logits: None)
    load_tokenizer(adapter_dir, trust_remote_code=meta.get("trust_remote_code", False),
                   chat_template=meta.get("chat_template_override")).save_pretrained(out_dir)


def reference_logits(adapter_dir: str, phase: PhasePlan) -> Callable[[Any], Any]:
    """ids -> float32 logits of base + adapter, unmerged, on the merge phase's device."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(read_adapter_metadata(adapter_dir), "float32", phase.device),
                                      adapter_dir).eval()
    return lambda ids: model(input_ids=ids.to(phase.device)).logits.float().cpu()
