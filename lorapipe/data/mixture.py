"""A weighted mixture of data sources (`data.sources`): how many accepted rows each source gives, and which.

Sizes: without weights every source gives all its accepted rows, or `max_rows` of them. With weights, source i's
share is weight_i / sum(weights), its rows available are min(accepted_i, max_rows_i), and the mixture holds
`data.mixture_rows` rows, or by default the most it can without taking any source's row twice
(N = min_i available_i / share_i, LLaMA-Factory's "first_exhausted"); each source then gives round(N x share_i).

Which rows: each accepted row is ranked by sha256(seed, its content), and a source gives its lowest-ranked rows. A
row's rank depends on nothing else, so the same sources and seed give the same rows, and adding rows to one source
changes no other source's rows (at most how many it gives when the mixture's size follows that source).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional


class MixtureError(ValueError):
    """The mixture cannot be drawn as configured: what is wrong (naming the source) and the fix."""

    def __init__(self, message: str, fix: str):
        self.message, self.fix = message, fix
        super().__init__(f"{message}: {fix}")


@dataclass(frozen=True)
class SourcePlan:
    """What one source gives the mixture (neither weight nor max_rows: every accepted row)."""

    name: str
    weight: Optional[float] = None
    max_rows: Optional[int] = None


@dataclass(frozen=True)
class SourceInput:
    """One source as validation reads it: its files and how its rows are read (None: the data section's)."""

    plan: SourcePlan
    files: list[str]
    sha256: str = ""
    fmt: Optional[str] = None
    prompt_key: Optional[str] = None
    completion_key: Optional[str] = None

    @property
    def mixes(self) -> bool:
        """It takes part of its rows, or a share: the run samples."""
        return self.plan.weight is not None or self.plan.max_rows is not None


def mixture_counts(sources: list[SourcePlan], accepted: list[int], mixture_rows: Optional[int] = None) -> list[int]:
    """The rows each source gives the mixture (see the module docstring)."""
    available = [n if s.max_rows is None else min(n, s.max_rows) for s, n in zip(sources, accepted)]
    if not any(s.weight for s in sources):
        return available
    total = sum(s.weight or 0.0 for s in sources)
    shares = [(s.weight or 0.0) / total for s in sources]
    largest = min(math.floor(a / share + 1e-9) for a, share in zip(available, shares))
    size = largest if mixture_rows is None else mixture_rows
    counts = _apportion(size, shares)
    short = [f"{s.name} ({c} rows for its share {share:.1%}; {a} accepted"
             + (f" within max_rows {s.max_rows}" if s.max_rows is not None and s.max_rows < n else "") + ")"
             for s, n, a, c, share in zip(sources, accepted, available, counts, shares) if c > a]
    if short:
        raise MixtureError(f"data.mixture_rows {size} takes more rows than a source has: {', '.join(short)}",
                           f"lower data.mixture_rows to at most {largest} (no row taken twice), or add rows to that "
                           "source")
    return counts


def _apportion(size: int, shares: list[float]) -> list[int]:
    """`size` split by `shares` in whole rows that add up to `size` (largest remainders first, ties by order)."""
    exact = [size * share for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:size - sum(counts)]:
        counts[i] += 1
    return counts


def row_rank(seed: int, content_key: str) -> bytes:
    """A row's place in its source's draw: a function of the seed and the row's content only."""
    return hashlib.sha256(f"{seed}\x00{content_key}".encode()).digest()


def draw(keys: list[str], count: int, seed: int) -> list[int]:
    """The indexes (in file order) of the `count` rows of one source that the mixture takes."""
    if count >= len(keys):
        return list(range(len(keys)))
    ranked = sorted(range(len(keys)), key=lambda i: row_rank(seed, keys[i]))
    return sorted(ranked[:count])
