"""Benchmark: the quickstart pipeline uncached vs fully cached (wall time of `lorapipe run`, whole process).

Runs on a fresh temporary ZenML store. Uncached runs use --no-cache and train.resume=false so every step,
training included, really runs; cached runs are plain re-runs of the same config. Medians of N runs each.

    python bench/pipeline_cache.py                      # this checkout
    python bench/pipeline_cache.py --baseline DIR       # and an earlier commit's checkout, interleaved run by run

With --baseline (a `git worktree` of the earlier commit, its models/ folder holding the tiny model), each run of
this checkout is followed by the same run of the baseline's, each side on a store of its own, through this
checkout's Python environment; the result adds the baseline's medians and the ratios. Writes
bench/results/pipeline_cache.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N = int(os.environ.get("BENCH_RUNS", "3"))


class Side:
    """One checkout's `lorapipe` on a store of its own."""

    def __init__(self, checkout: Path):
        self.checkout = checkout
        # the command as that commit named it: lorapipe_app.cli since the application moved out of the library
        module = "lorapipe_app.cli" if (checkout / "lorapipe_app" / "cli").is_dir() else "lorapipe.cli"
        self.cmd = ([str(REPO / ".venv" / "bin" / "lorapipe")] if checkout == REPO
                    else [sys.executable, "-m", module])
        self.env = dict(os.environ, ZENML_CONFIG_PATH=tempfile.mkdtemp(prefix="lorapipe-bench-zen-"),
                        ZENML_ANALYTICS_OPT_IN="false", PYTHONPATH=str(checkout))
        self.uncached: list[float] = []
        self.cached: list[float] = []
        self.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                                     text=True).stdout.strip()

    def run(self, args: list[str]) -> tuple[float, str]:
        start = time.perf_counter()
        proc = subprocess.run([*self.cmd, "run", "-c", "configs/quickstart.yaml", *args], cwd=self.checkout,
                              env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"lorapipe run failed in {self.checkout}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        summary = next(line for line in proc.stdout.splitlines() if "steps from cache" in line)
        return seconds, summary

    def medians(self) -> dict:
        return {"commit": self.commit, "uncached_seconds": self.uncached, "cached_seconds": self.cached,
                "uncached_median_s": statistics.median(self.uncached),
                "cached_median_s": statistics.median(self.cached)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit, run interleaved")
    args = parser.parse_args()
    sides = [Side(REPO)] + ([Side(args.baseline.resolve())] if args.baseline else [])
    for _ in range(N):
        for side in sides:
            s, line = side.run(["--no-cache", "--set", "train.resume=false"])
            side.uncached.append(s)
            print(f"{side.commit} uncached {s:.1f}s  {line}")
    for side in sides:
        side.run([])  # the cache entry for the plain config
    for _ in range(N):
        for side in sides:
            s, line = side.run([])
            side.cached.append(s)
            print(f"{side.commit} cached   {s:.1f}s  {line}")
    this = sides[0].medians()
    result = {
        "benchmark": "pipeline_cache", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "config": "configs/quickstart.yaml", "runs": N, **this,
        "speedup_cached": this["uncached_median_s"] / this["cached_median_s"],
    }
    if len(sides) > 1:
        before = sides[1].medians()
        result["baseline"] = before
        result["uncached_vs_baseline"] = this["uncached_median_s"] / before["uncached_median_s"]
        result["cached_vs_baseline"] = this["cached_median_s"] / before["cached_median_s"]
    out = REPO / "bench" / "results" / "pipeline_cache.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
