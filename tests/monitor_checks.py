"""What every backend's training monitor must leave behind, checked the same way for hf, unsloth and mlx."""

import csv
import json
import re
from pathlib import Path

from lorapipe.training.monitoring import METRIC_COLUMNS, PLOTS

PROGRESS_LINE = re.compile(r"^step (\d+)/(\d+) loss \d+\.\d\d lr \d\.\de[-+]\d\d [\d.]+[kMG]? tok/s "
                           r"mem \d+(?:\.\d\d GiB| MiB) "
                           r"eta \d+:\d\d:\d\d$", re.M)


def assert_monitor_outputs(folder: Path, steps: list[int], max_steps: int, stdout: str) -> list[dict]:
    """metrics.jsonl and metrics.csv with exactly METRIC_COLUMNS, one row per logged step; the three plots; one
    progress line per logged step in the common format. Returns the rows."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == steps
    for r in rows:
        assert list(r) == METRIC_COLUMNS
        assert r["loss"] > 0 and r["learning_rate"] is not None and r["grad_norm"] > 0
        assert r["tokens_per_second"] > 0 and r["memory_gib"] > 0 and r["epoch"] > 0
    with open(folder / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == METRIC_COLUMNS
        assert [int(r["step"]) for r in reader] == steps
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    progress = [(int(a), int(b)) for a, b in PROGRESS_LINE.findall(stdout)]
    assert progress == [(s, max_steps) for s in steps], stdout[-2000:]
    return rows
