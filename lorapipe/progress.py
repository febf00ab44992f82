"""lorapipe's own progress bars (tqdm, on stderr) for work a person waits on: tokenizing, scoring, generating.
Short work gets none, so a quickstart's output stays lorapipe's lines; the libraries' own bookkeeping bars
(datasets' map/filter) are switched off by the CLI."""

from __future__ import annotations

from typing import Iterable, Optional, TypeVar

T = TypeVar("T")
MIN_ITEMS = 32  # fewer rows than this finish in seconds: no bar


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "row") -> Iterable[T]:
    count = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    if count is not None and count < MIN_ITEMS:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=count, unit=unit, leave=False, mininterval=1.0)
