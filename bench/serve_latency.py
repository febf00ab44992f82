"""Benchmark: `lorapipe serve` (issue 23, point 5, the transformers side): time to the first streamed token and
generated tokens per second, for 1 client and for 4 concurrent clients, on the quickstart's tiny model merged in
float32, on this machine's CPU.

A LoRA adapter is trained (hf, 12 steps) and merged with its parity check, `lorapipe serve` starts on a free port in
its own process, and each client streams greedy answers (MAX_TOKENS new tokens, the same prompts) over plain HTTP.
ROUNDS rounds, interleaved (1 client, then 4); medians. Writes bench/results/serve_latency.json.
"""

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ROUNDS, MAX_TOKENS = int(os.environ.get("BENCH_RUNS", 3)), 32
PROMPTS = ["What did Apple announce at WWDC25 for developers?", "What is new in SwiftUI?",
           "How does the new design language look?", "What changed in Xcode?"]


def stream(url: str, prompt: str) -> dict:
    """One streamed request: seconds to the first content chunk, total seconds, the answer's text and the generated
    tokens (the server's count, stream_options.include_usage)."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": MAX_TOKENS, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    start, first, text, tokens = time.perf_counter(), None, "", 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):  # the last chunk: the server's own count of generated tokens
                tokens = chunk["usage"]["completion_tokens"]
                continue
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                first = first if first is not None else time.perf_counter() - start
                text += delta
    return {"first_token_s": first, "seconds": time.perf_counter() - start, "text": text, "tokens": tokens}


def clients(url: str, n: int) -> dict:
    """`n` clients at once, each streaming one answer."""
    results: list[dict] = [{} for _ in range(n)]

    def run(i: int) -> None:
        results[i] = stream(url, PROMPTS[i % len(PROMPTS)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"clients": n, "first_token_s": [r["first_token_s"] for r in results], "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}


def main() -> int:
    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.data.dataset import ConversationDataset
    from lorapipe.data.formats import read_records
    from lorapipe.data.split import split_records
    from lorapipe.hardware.plan import PhasePlan, decide_plan, model_size
    from lorapipe.hardware.probe import package_versions, probe
    from lorapipe.models.tiny import build_tiny_model
    from lorapipe.phases.merge import merge_adapter
    from lorapipe.phases.train_in_process import train_in_process

    data = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
    train, _, test = split_records(read_records([str(data)]).records, 0.0, 0.1)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorapipe-serve-bench-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny", [data])
        cfg = TrainSection(backend="hf", device="cpu", dtype="float32", max_seq_length=128, max_steps=12,
                           micro_batch_size=4, effective_batch_size=4, save_steps=1000, output_root=str(root))
        plan = decide_plan(cfg, probe(str(root)), model_size(str(model))).train
        adapter = train_in_process(ModelSection(name_or_path=str(model)), cfg, 7, plan,
                                   ConversationDataset(train.records[:96]), ConversationDataset([]), root / "w",
                                   root / "w" / "adapter").path
        merged = root / "merged"
        merge_adapter(adapter, str(merged), test, PhasePlan(phase="merge", device="cpu", dtype="float32",
                                                            batch_size=1, max_seq_length=128, reason="bench"),
                      parity_samples=2, parity_max_new_tokens=4)
        proc = subprocess.Popen([sys.executable, "-m", "lorapipe_app.cli", "serve", str(merged), "--port", "0"],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)
        url = next(m.group(1) for line in proc.stderr if (m := re.search(r"at (http://[\d.:]+/v1)", line)))
        try:
            clients(url, 1)  # warm-up: the first request pays for lazy initialisation
            for _ in range(ROUNDS):
                rounds.append({"one": clients(url, 1), "four": clients(url, 4)})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    def median(kind: str, key: str) -> float:
        values = [r[kind][key] for r in rounds]
        return statistics.median(values)

    summary = {
        "one_client": {"first_token_s": statistics.median(r["one"]["first_token_s"][0] for r in rounds),
                       "tokens_per_s": median("one", "tokens_per_s")},
        "four_clients": {"first_token_s_median_of_clients": statistics.median(
                             t for r in rounds for t in r["four"]["first_token_s"]),
                         "first_token_s_worst": statistics.median(max(r["four"]["first_token_s"]) for r in rounds),
                         "tokens_per_s_all_clients": median("four", "tokens_per_s")},
    }
    out = {"benchmark": "lorapipe serve (transformers, tiny model merged in float32, CPU)", "rounds": ROUNDS,
           "max_tokens": MAX_TOKENS, "summary": summary, "runs": rounds,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": package_versions()}
    path = REPO / "bench" / "results" / "serve_latency.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
