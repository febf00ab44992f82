"""Benchmark: serving parity (issue 22) on the quickstart's tiny Llama and on another family (Qwen3, built from its
config with random weights by bench/memory_families.py: `python bench/memory_families.py build`).

Each model trains a LoRA adapter (hf backend, fp32, the quickstart rows, 12 steps), is merged in float32 and in
bfloat16, and the merge's parity check answers PROMPTS test prompts greedily (TOKENS new tokens) through base+adapter
and through the merged folder as served; one more merge whose saved tokenizer is given another chat template shows
the check catching a broken export. Writes bench/results/parity.json.
"""

import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROMPTS, TOKENS, STEPS = 8, 16, 12
QWEN3 = REPO / "bench" / ".models" / "qwen3-bf16"


def train(model_dir: Path, work: Path, records: list) -> str:
    """A LoRA adapter on `records` (hf, fp32, STEPS steps); its folder."""
    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe
    from lorapipe.phases.train_in_process import train_in_process

    cfg = TrainSection(backend="hf", device="cpu", dtype="float32", max_seq_length=128, max_steps=STEPS,
                       learning_rate=5e-3, micro_batch_size=4, effective_batch_size=4, save_steps=1000,
                       output_root=str(work))
    plan = decide_plan(cfg, probe(str(work)), model_size(str(model_dir))).train
    from lorapipe.data.dataset import ConversationDataset

    return train_in_process(ModelSection(name_or_path=str(model_dir)), cfg, 7, plan, ConversationDataset(records),
                            ConversationDataset([]), work / "w", work / "w" / "adapter").path


def merge(adapter: str, out: Path, test, dtype: str, before_check=None) -> dict:
    from lorapipe.hardware.plan import PhasePlan
    from lorapipe.phases.merge import merge_adapter

    plan = PhasePlan(phase="merge", device="cpu", dtype=dtype, batch_size=1, max_seq_length=128, reason="bench")
    check = merge_adapter(adapter, str(out), test, plan, parity_samples=PROMPTS, parity_max_new_tokens=TOKENS,
                          before_check=before_check)
    parity = check.serving_parity or {}
    return {"dtype": dtype, "logits_check_passed": check.passed, "max_abs_logit_diff": check.max_abs_logit_diff,
            "parity_passed": parity.get("passed"), "identical": parity.get("identical"),
            "prompts": parity.get("prompts"), "near_ties": sum(r["near_tie"] for r in parity.get("rows", [])),
            "reason": parity.get("reason")}


def another_template(folder: Path) -> None:
    from transformers import AutoTokenizer

    from lorapipe.data.render import FALLBACK_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))


def main() -> int:
    from lorapipe.data.formats import read_records
    from lorapipe.data.split import split_records
    from lorapipe.hardware.probe import package_versions
    from lorapipe.models.tiny import build_tiny_model

    if not (QWEN3 / "config.json").exists():
        sys.exit("build the family models first: python bench/memory_families.py build")
    data = REPO / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
    train_rows, _, test = split_records(read_records([str(data)]).records, 0.0, 0.1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorapipe-parity-") as tmp:
        root = Path(tmp)
        llama = build_tiny_model(root / "tiny-llama", [data])
        for name, folder in (("tiny Llama (quickstart)", llama), ("Qwen3 (random weights from its config)", QWEN3)):
            adapter = train(folder, root / f"train-{folder.name}", train_rows.records[:96])
            for dtype in ("float32", "bfloat16"):
                rows.append({"model": name, **merge(adapter, root / f"merged-{folder.name}-{dtype}", test, dtype)})
                print(json.dumps(rows[-1]), flush=True)
            rows.append({"model": name, "broken_export": "merged tokenizer given another chat template",
                         **merge(adapter, root / f"broken-{folder.name}", test, "float32", another_template)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"benchmark": "serving parity: base+adapter vs the merged folder as served", "prompts": PROMPTS,
           "max_new_tokens": TOKENS, "train_steps": STEPS,
           "machine": {"platform": platform.platform(), "machine": platform.machine(),
                       "python": platform.python_version()},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": package_versions(),
           "rows": rows}
    path = REPO / "bench" / "results" / "parity.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
