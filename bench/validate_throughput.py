"""Benchmark: `lorapipe validate` on a generated 1,000,000-row JSONL (the issue's goal: >= 20,000 rows/s for
the format/schema pass, peak RSS < 1 GiB).

Two passes, each in a fresh process so peak RSS is the pass's own: the schema pass (read, normalise, row
checks, duplicates, GE suite; no tokenizer) over all rows, and the tokenizing pass (chat template, masking,
learns-to-stop audit with the tiny model's tokenizer) over the first TOKENIZE_ROWS rows. Medians of RUNS runs.
BENCH_BASELINE=<a checkout of an earlier commit> also runs the tokenizing pass of that checkout, interleaved with
this one's, run for run (the ratio is of medians measured side by side). Writes bench/results/validate_throughput.json.
"""

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = int(os.environ.get("BENCH_ROWS", "1000000"))
TOKENIZE_ROWS = int(os.environ.get("BENCH_TOKENIZE_ROWS", "100000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
WORDS = "the model data train adapter token rank alpha merge learn stop batch memory layer value query".split()


def generate(path: Path, rows: int) -> None:
    """prompt/completion rows of varied length; 1% exact duplicates and 0.1% broken lines, like real exports."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(rows):
            r = rng.random()
            if r < 0.001:
                fh.write('{"prompt": "truncated", "completion": \n')
                continue
            if r < 0.011 and i > 0:
                fh.write('{"prompt": "repeat me", "completion": "the same answer"}\n')
                continue
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + f" #{i}?"
            completion = " ".join(rng.choices(WORDS, k=rng.randint(5, 80))) + "."
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


CHILD = """
import json, resource, sys, time
from lorapipe.data.validation import validate_dataset
path, model = sys.argv[1], sys.argv[2]
tok = None
if model != "-":
    from lorapipe.models.loading import load_tokenizer
    tok = load_tokenizer(model)
start = time.perf_counter()
out = validate_dataset([path], tokenizer=tok, max_seq_length=512 if tok else None, overlength="truncate",
                       on_bad_rows="quarantine", max_bad_fraction=1.0, keep_records=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rows": out.report.rows_read, "rejected": out.report.rows_rejected,
                  "duplicates": out.report.problem_counts.get("duplicate", 0),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


BASELINE = os.environ.get("BENCH_BASELINE")


def run_pass(path: Path, model: str, repo: Path = REPO) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), model], capture_output=True, text=True, cwd=repo,
                          env=env)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lorapipe-bench-"))
    big, small = tmp / "rows.jsonl", tmp / "rows_small.jsonl"
    generate(big, ROWS)
    with open(big) as src, open(small, "w") as dst:
        for i, line in enumerate(src):
            if i >= TOKENIZE_ROWS:
                break
            dst.write(line)
    model = REPO / "models" / "tiny-llama"
    if not (model / "config.json").exists():
        sys.exit("build the tiny model first: make tiny-model")
    schema = [run_pass(big, "-") for _ in range(RUNS)]
    tokenize, baseline = [], []
    for _ in range(RUNS):  # interleaved with the baseline's runs, when there is one
        tokenize.append(run_pass(small, str(model)))
        if BASELINE:
            baseline.append(run_pass(small, str(model), Path(BASELINE)))
    for name, runs in (("schema", schema), ("tokenize", tokenize), ("tokenize, baseline", baseline)):
        for r in runs:
            print(f"{name}: {r['rows']} rows in {r['seconds']:.1f}s = {r['rows'] / r['seconds']:,.0f} rows/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    result = {
        "benchmark": "validate_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "file_mb": round(big.stat().st_size / 2**20, 1), "runs": RUNS,
        "schema_pass": {"rows": schema[0]["rows"], "median_seconds": med(schema, "seconds"),
                        "rows_per_second": schema[0]["rows"] / med(schema, "seconds"),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in schema),
                        "rejected": schema[0]["rejected"], "duplicates": schema[0]["duplicates"]},
        "tokenize_pass": {"rows": tokenize[0]["rows"], "median_seconds": med(tokenize, "seconds"),
                          "rows_per_second": tokenize[0]["rows"] / med(tokenize, "seconds"),
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in tokenize), "tokenizer": "tiny-llama (BPE 1024)"},
        "goal": {"schema_rows_per_second": 20000, "peak_rss_mb": 1024, "tokenize_rows_per_second": 10000},
    }
    if baseline:
        result["tokenize_pass_baseline"] = {
            "checkout": subprocess.run(["git", "-C", BASELINE, "rev-parse", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
            "median_seconds": med(baseline, "seconds"),
            "rows_per_second": baseline[0]["rows"] / med(baseline, "seconds"),
            "per_run_seconds": [r["seconds"] for r in baseline]}
        result["tokenize_pass"]["per_run_seconds"] = [r["seconds"] for r in tokenize]
        result["tokenize_speedup"] = med(baseline, "seconds") / med(tokenize, "seconds")
    out = REPO / "bench" / "results" / "validate_throughput.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
