"""Run every benchmark in bench/ in turn (each writes its JSON to bench/results/). Used by `make bench`."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script, args in (("pipeline_cache.py", []), ("validate_throughput.py", []), ("backends.py", []),
                     ("eval_batching.py", []), ("merge_memory.py", []), ("memory_accuracy.py", []),
                     ("memory_families.py", ["measure"]), ("memory_anchors.py", []), ("padding.py", []),
                     ("classification.py", [])):
    print(f"== {script} {' '.join(args)}".rstrip(), flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
