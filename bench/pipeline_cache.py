"""Benchmark: the quickstart pipeline uncached vs fully cached (wall time of `lorapipe run`, whole process).

Runs on a fresh temporary ZenML store. Uncached runs use --no-cache and train.resume=false so every step,
training included, really runs; cached runs are plain re-runs of the same config. Medians of N runs each.
Writes bench/results/pipeline_cache.json.
"""

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


def run(args, env):
    start = time.perf_counter()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "lorapipe"), "run", "-c", "configs/quickstart.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lorapipe run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = next(line for line in proc.stdout.splitlines() if "steps from cache" in line)
    return seconds, summary


def main():
    env = dict(os.environ, ZENML_CONFIG_PATH=tempfile.mkdtemp(prefix="lorapipe-bench-zen-"),
               ZENML_ANALYTICS_OPT_IN="false")
    uncached, cached = [], []
    for _ in range(N):
        s, line = run(["--no-cache", "--set", "train.resume=false"], env)
        uncached.append(s)
        print(f"uncached {s:.1f}s  {line}")
    run([], env)  # the cache entry for the plain config
    for _ in range(N):
        s, line = run([], env)
        cached.append(s)
        print(f"cached   {s:.1f}s  {line}")
    result = {
        "benchmark": "pipeline_cache", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "config": "configs/quickstart.yaml", "runs": N,
        "uncached_seconds": uncached, "cached_seconds": cached,
        "uncached_median_s": statistics.median(uncached), "cached_median_s": statistics.median(cached),
        "speedup_cached": statistics.median(uncached) / statistics.median(cached),
    }
    out = REPO / "bench" / "results" / "pipeline_cache.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
