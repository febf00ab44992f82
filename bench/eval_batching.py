"""Benchmark: the evaluate step's generation, batched (left-padded, the quickstart's evaluate.batch_size) against one
prompt at a time, on the tiny model at the quickstart's sizes.

    .venv/bin/python bench/eval_batching.py

For each size (generation rows x max_new_tokens) the two ways run interleaved (one-at-a-time, batched, one-at-a-time,
...) RUNS times each in one process after a warm-up, and the medians are kept; both ways must give the same tokens.
The tiny model's random weights never say EOS, so every row runs to max_new_tokens: no row finishes early and waits
for its batch. Writes bench/results/eval_batching.json.
"""

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
BATCH_SIZE = int(os.environ.get("BENCH_BATCH_SIZE", "4"))  # configs/quickstart.yaml evaluate.batch_size
SIZES = [(8, 64), (16, 64)]  # (generation rows, max_new_tokens): quickstart's 8 rows, and twice that
DATA = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"


def tiny_model_folder() -> Path:
    folder = REPO / "models" / "tiny-llama"
    if (folder / "config.json").exists():
        return folder
    from lorapipe.models.tiny import build_tiny_model

    return build_tiny_model(Path(tempfile.mkdtemp(prefix="lorapipe-bench-")) / "tiny-llama", [DATA])


def main() -> None:
    import torch

    from lorapipe.data.end_tokens import end_token_ids
    from lorapipe.data.formats import read_records
    from lorapipe.evaluation.metrics import generate_batched, generation_rows
    from lorapipe.models.loading import load_model, load_tokenizer

    folder = tiny_model_folder()
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder), "float32", device="cpu")
    ends = end_token_ids(tokenizer)
    # the test split's rows are a content-hash sample of these; the first N generable rows stand in for them
    rows = generation_rows(tokenizer, read_records([str(DATA)]).records)
    generate_batched(model, tokenizer, [rows[0].prompt], 4, 1, ends, seed=0)  # warm-up: first-call overheads

    results = []
    for count, max_new_tokens in SIZES:
        prompts = [r.prompt for r in rows[:count]]
        times: dict[str, list[float]] = {"one_at_a_time": [], "batched": []}
        outputs: dict[str, list] = {}
        for _ in range(RUNS):
            for way, batch_size in (("one_at_a_time", 1), ("batched", BATCH_SIZE)):
                start = time.perf_counter()
                outputs[way] = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, ends, seed=42)
                times[way].append(time.perf_counter() - start)
        single, batched = statistics.median(times["one_at_a_time"]), statistics.median(times["batched"])
        new_tokens = sum(len(o) for o in outputs["batched"])
        result = {"generation_rows": count, "max_new_tokens": max_new_tokens, "batch_size": BATCH_SIZE,
                  "prompt_tokens": [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts],
                  "new_tokens": new_tokens, "identical_tokens": outputs["batched"] == outputs["one_at_a_time"],
                  "one_at_a_time_seconds": times["one_at_a_time"], "batched_seconds": times["batched"],
                  "median_one_at_a_time_seconds": single, "median_batched_seconds": batched,
                  "speedup": single / batched,
                  "batched_new_tokens_per_second": new_tokens / batched}
        print(f"{count} rows x {max_new_tokens} new tokens: one at a time {single:.2f}s, batched ({BATCH_SIZE}) "
              f"{batched:.2f}s, x{single / batched:.2f}; identical: {result['identical_tokens']}")
        results.append(result)

    out = {"benchmark": "eval_batching", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                      f"Python {platform.python_version()}, CPU float32",
           "model": f"{folder.name} (tiny random Llama, 2 layers, hidden 64)", "runs": RUNS,
           "how": "generate_batched, greedy, left-padded, stops on end_token_ids; interleaved runs, medians",
           "results": results}
    path = REPO / "bench" / "results" / "eval_batching.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
