"""A full disk while lorapipe writes a checkpoint or the merged model: one error that names the folder, the space the
write needs, the space free there and the fix, instead of a traceback about one half-written file.

What a full disk (or a spent quota) raises depends on the writer:

- Python's own writes (json): `OSError` with errno ENOSPC or EDQUOT;
- safetensors: `SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")`, and
  the tokenizers library (tokenizer.json): `Exception("No space left on device (os error 28)")`;
- `torch.save` (optimizer, scheduler, RNG state): `RuntimeError("[enforce fail at inline_container.cc:672] .
  unexpected pos 576 vs 534")`, no errno at all; taken for a full disk only when the folder has less free than the
  write needs.

A checkpoint cut short by a full disk cannot be resumed from and holds part of the space needed: `checkpoint_write`
removes it (once `checkpoint_problem` confirms it is incomplete), so the same command, once there is room, resumes
from the checkpoint before it. Checkpoints written before are not touched.

Plain library: no ZenML or torch import.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from lorapipe.hardware.probe import free_bytes
from lorapipe.units import format_bytes

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what safetensors (Rust's io::Error) and other wrappers say of ENOSPC / EDQUOT
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_QUOTA_TEXT = ("Disk quota exceeded", "os error 122")
_TORCH_WRITER_TEXT = ("PytorchStreamWriter", "inline_container")  # torch.save's zip writer, which drops the errno


class DiskFullError(OSError):
    """A write ran out of disk space (or quota); the message names the folder, the bytes needed and free, the fix."""

    def __init__(self, message: str, folder: Optional[str | Path] = None, needed_bytes: Optional[int] = None,
                 free_bytes: Optional[int] = None, code: int = errno.ENOSPC) -> None:
        super().__init__(code, message)
        self.message = message
        self.folder = Path(folder) if folder is not None else None
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.message

    def __reduce__(self) -> Any:  # OSError pickles its args (errno, text), which this __init__ does not take
        return type(self), (self.message, self.folder, self.needed_bytes, self.free_bytes, self.errno)


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def disk_full_kind(exc: BaseException, folder: str | Path, needed: Callable[[], Optional[int]]) -> Optional[str]:
    """"disk full" or "disk quota exceeded" when `exc` (or an exception it was raised from) is a write that found no
    room, else None. `needed()` (the bytes the write needs) is asked only for torch.save's errno-less error."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno == errno.EDQUOT) or any(t in text for t in _QUOTA_TEXT):
            return "disk quota exceeded"
        if (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(t in text for t in _DISK_FULL_TEXT):
            return "disk full"
        if (isinstance(e, RuntimeError) and any(t in text for t in _TORCH_WRITER_TEXT)
                and free_bytes(folder) < (needed() or 1)):
            return "disk full"
        e = e.__cause__ or e.__context__
    return None


def disk_full_error(folder: str | Path, what: str, needed: Optional[int], fix: str, done: str = "",
                    kind: str = "disk full") -> DiskFullError:
    """The error for a write of `what` into `folder` that found no room (`kind`: "disk full" or "disk quota
    exceeded"); `needed`: the bytes the write needs (None: unknown), `done`: what was cleaned up, said before the
    fix."""
    free = free_bytes(folder)
    need = f"it needs about {format_bytes(needed)} ({needed} bytes)" if needed else "it needs more room"
    message = (f"{kind} while writing {what} to {folder}: {need}, {format_bytes(free)} ({free} bytes) free there"
               f"{'; ' + done if done else ''}. Fix: {fix}")
    return DiskFullError(message, folder, needed, free, errno.EDQUOT if "quota" in kind else errno.ENOSPC)


def trainable_bytes_estimate(model: Any) -> int:
    """What a LoRA checkpoint of `model` holds, before any was written: the trainable weights in their dtype and
    AdamW's two float32 moments of each."""
    return sum(p.numel() * (p.element_size() + 8) for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def checkpoint_write(folder: Path, required: Sequence[str], estimate: Callable[[], int],
                     main_process: bool = True) -> Iterator[None]:
    """Around the write of one checkpoint folder (`<run_dir>/checkpoint-N`): a full disk raises `DiskFullError`.

    The bytes needed are the size of the newest complete checkpoint beside it (else `estimate()`). The cut folder is
    removed (by the main process) when `checkpoint_problem` finds it incomplete: it cannot be resumed from, and its
    files are part of the space needed. Other checkpoints are left as they are."""
    from lorapipe.training.checkpoints import checkpoint_problem, complete_checkpoints

    try:
        yield
    except Exception as exc:
        earlier = [c for c in complete_checkpoints(folder.parent) if c != folder]
        needed = functools.cache(lambda: folder_bytes(earlier[-1]) if earlier else estimate())
        kind = disk_full_kind(exc, folder.parent, needed)
        if kind is None:
            raise
        done = ""
        problem = checkpoint_problem(folder, required) if folder.exists() else None
        if problem and main_process:
            cut = folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            done = f"the cut {folder.name} ({problem}; {format_bytes(cut)}) was removed"
        resume = f"it resumes from {earlier[-1].name}" if earlier else "it starts over"
        fix = (f"free space there and run the same command again ({resume}), or set train.output_root to a disk "
               f"with room (move {folder.parent.parent} there too to keep the checkpoints)")
        raise disk_full_error(folder.parent, f"checkpoint {folder.name}", needed(), fix, done, kind) from exc


def merged_model_bytes(adapter_meta: dict, dtype: str) -> Optional[int]:
    """The merged model's weights in `dtype`: the base's parameters (from its config) x bytes each; None when the
    base's config cannot be read."""
    from lorapipe.hardware.facts import model_facts
    from lorapipe.hardware.memory import DTYPE_BYTES

    try:
        facts = model_facts(adapter_meta["base_model"], adapter_meta.get("base_revision"),
                            adapter_meta.get("trust_remote_code", False))
    except Exception:  # noqa: BLE001 -- the error being reported matters more than its size
        return None
    return facts.total_parameters * DTYPE_BYTES.get(dtype, 2)


@contextlib.contextmanager
def merged_model_write(folder: Path, needed: Callable[[], Optional[int]],
                       clear: Callable[[], None]) -> Iterator[None]:
    """Around the write of the merged model into `folder`: a full disk raises `DiskFullError` after `clear()` removed
    the shards written so far (a merge is complete only once its record is written; a re-run writes them again)."""
    try:
        yield
    except Exception as exc:
        needed = functools.cache(needed)
        kind = disk_full_kind(exc, folder, needed)
        if kind is None:
            raise
        clear()
        fix = ("free space there, or write the merged model to a disk with room (in a pipeline run it goes to the "
               "artifact store: register a local artifact store with --path on a disk with room and set a stack "
               "that uses it)")
        raise disk_full_error(folder, "the merged model", needed(), fix, "the shards written so far were removed",
                              kind) from exc
