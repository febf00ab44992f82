"""Build `source_routing.jsonl`: a 3-class request-routing set whose label is the data set a request came from.

    python data/classification/build_source_routing.py            # rewrites data/classification/source_routing.jsonl
    python data/classification/build_source_routing.py OUT.jsonl  # writes elsewhere (the test compares the two)

Reads ../shared/datasets beside the repo root (see ATTRIBUTION.md). Deterministic: the first eligible rows of each
source in file order, then interleaved by the sha256 of the text, so the output is the same byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"
OUT = Path(__file__).resolve().parent / "source_routing.jsonl"
MAX_CHARS = 300  # longer texts are skipped, never cut
# label -> rows taken; imbalanced on purpose (majority baseline 200 / 450 = 44 %)
COUNTS = {"general": 200, "sql": 150, "sports": 100}


def general(datasets: Path) -> Iterator[str]:
    """Alpaca `instruction`, with its `input` on the next line when there is one."""
    for row in json.loads((datasets / "alpaca_en_demo.json").read_text(encoding="utf-8")):
        instruction, extra = row["instruction"].strip(), row["input"].strip()
        yield f"{instruction}\n{extra}" if extra else instruction


def sql(datasets: Path) -> Iterator[str]:
    """The natural-language question (the `Q: ` line) of a WikiSQL row, without the table or the SQL answer."""
    path = datasets / "wikisql" / "train.jsonl"
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        questions = [x[3:].strip() for x in json.loads(line)["text"].split("\n") if x.startswith("Q: ")]
        if len(questions) != 1:
            raise ValueError(f"{path}:{n}: expected one 'Q: ' line, found {len(questions)}")
        if "SELECT" not in questions[0]:  # the answer's keyword must not give the label away
            yield questions[0]


def sports(datasets: Path) -> Iterator[str]:
    """The `prompt` of a wwdc25 row: questions about Super Bowl LIX (the WWDC25 MLX demo's new-knowledge data)."""
    for line in (datasets / "wwdc25" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        yield json.loads(line)["prompt"].strip()


SOURCES = {"general": general, "sql": sql, "sports": sports}


def take(texts: Iterable[str], n: int, seen: set[str]) -> list[str]:
    """The first `n` texts of at most MAX_CHARS that no earlier row (of any label) already has."""
    kept: list[str] = []
    for text in texts:
        if len(kept) == n:
            break
        if text and len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            kept.append(text)
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} eligible texts, {n} wanted")
    return kept


def build(datasets: Path = DATASETS) -> list[dict]:
    seen: set[str] = set()
    rows = [{"text": t, "label": label} for label, n in COUNTS.items()
            for t in take(SOURCES[label](datasets), n, seen)]
    return sorted(rows, key=lambda r: hashlib.sha256(r["text"].encode("utf-8")).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=OUT, help=f"output JSONL (default: {OUT})")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help=f"source folder (default: {DATASETS})")
    args = parser.parse_args()
    rows = build(args.datasets)
    args.out.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(f"{args.out}: {len(rows)} rows, " + ", ".join(f"{k} {n}" for k, n in COUNTS.items()))


if __name__ == "__main__":
    main()
