"""What the register step writes on a model version, and the rule that sets its stage (no ZenML here)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

from lorapipe.evaluation.metrics import EvalMetrics


def git_commit(repo_dir: str | Path = ".") -> dict:
    """The code's commit and whether the tree had uncommitted changes (reproducibility, like the seed notebook)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    if sha.returncode != 0:
        return {"commit": "unknown", "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def decide_stage(metrics: EvalMetrics, merge_passed: bool, stage_if_better: str,
                 min_perplexity_gain: float) -> tuple[Optional[str], str]:
    """(stage or None, reason). Promote only when the tuned model beats the base by the required margin."""
    if stage_if_better == "none":
        return None, "register.stage_if_better is 'none'"
    if not merge_passed:
        return None, "the merged model failed its logits check"
    if not metrics.tuned_beats_base:
        return None, (f"tuned perplexity {metrics.tuned.perplexity:.3f} does not beat base "
                      f"{metrics.base.perplexity:.3f}")
    if metrics.perplexity_gain < min_perplexity_gain:
        return None, (f"perplexity gain {metrics.perplexity_gain:.1%} is below "
                      f"register.min_perplexity_gain={min_perplexity_gain:.1%}")
    return stage_if_better, (f"tuned perplexity {metrics.tuned.perplexity:.3f} beats base "
                             f"{metrics.base.perplexity:.3f} ({metrics.perplexity_gain:.1%} gain)")
