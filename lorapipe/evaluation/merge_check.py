"""The merge check's parts, whichever task: the reference logits of base + adapter kept on disk before the merge, and
the verdict of comparing the reloaded merged folder with them (each task compares its own logits:
`lorapipe.tasks.<task>.compare_merged`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from lorapipe.units import ReadsGbNames

# PEFT: reference and merged model run in the same dtype, so logits differ by the rounding of W + BA to it only.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}
COMPARE_POSITIONS = 32  # logits compared per slice


class MergeCheckFailed(RuntimeError):
    """The merged model's logits differ from base+adapter beyond the tolerance: it is not registered."""


class MergeCheck(ReadsGbNames):
    dtype: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tolerance: float
    passed: bool
    rows_checked: int
    greedy_agreement: float = 1.0  # share of positions where merged and base+adapter pick the same argmax token
    positions_checked: int = 0
    memory_gib: float = 0.0  # the merge's peak: CUDA's allocated peak, the process's resident high-water mark on CPU
    memory_at_start_gib: Optional[float] = None  # what the process held when the merge began
    # greedy answers of base+adapter and of the merged folder as served (lorapipe.phases.parity); a failure
    # keeps the version from promotion, not from registration
    serving_parity: Optional[dict] = None

    def require_passed(self) -> None:
        if not self.passed:
            raise MergeCheckFailed(
                f"the merged model's logits differ from base+adapter by up to {self.max_abs_logit_diff:.3g} (mean "
                f"{self.mean_abs_logit_diff:.3g}, greedy agreement {self.greedy_agreement:.1%}), above the tolerance "
                f"{self.tolerance:.3g} for {self.dtype} on {self.rows_checked} rows; the merged weights are wrong or "
                f"too coarse: try merge.dtype: float32, or raise merge.logits_atol if the difference is rounding")


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
