"""Recent pipeline runs, as `lorapipe runs` shows them: status, duration, steps served from the cache, and the
model version each run registered with its stage now."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from lorapipe_app.api import PIPELINE_NAME
from lorapipe_app.lineage import stage_name


def _seconds(start: Optional[datetime], end: Optional[datetime]) -> Optional[float]:
    if start is None:
        return None
    if end is None:  # still running: so far
        now = datetime.now(timezone.utc) if start.tzinfo else datetime.utcnow()
        return (now - start).total_seconds()
    return (end - start).total_seconds()


def recent_runs(limit: int = 10) -> list[dict[str, Any]]:
    from zenml.client import Client

    client = Client()
    page = client.list_pipeline_runs(pipeline_name=PIPELINE_NAME, sort_by="desc:created", size=limit, hydrate=True)
    rows = []
    for run in page.items:
        steps = run.steps
        cached = sorted(n for n, s in steps.items() if str(s.status).endswith("cached"))
        failed = sorted(n for n, s in steps.items() if str(s.status).endswith("failed"))
        mv = run.model_version
        rows.append({
            "run": run.name, "id": str(run.id), "status": str(run.status).rsplit(".", 1)[-1],
            "created": run.created.isoformat(timespec="seconds"),
            "duration_s": _round(_seconds(run.start_time, run.end_time)),
            "steps": len(steps), "cached_steps": cached, "failed_steps": failed,
            "trained": bool(steps) and "train_adapter" in steps and "train_adapter" not in cached,
            "model": mv.model.name if mv else None, "model_version": mv.name if mv else None,
            "stage": stage_name(mv) if mv else None,
            "schedule": str(run.schedule.name) if getattr(run, "schedule", None) else None,
        })
    return rows


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def format_runs(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["no lorapipe run in this ZenML store yet: `lorapipe run -c configs/quickstart.yaml`"]
    header = f"{'run':<40} {'status':<10} {'created':<19} {'time':>8} {'cached':>7}  model version (stage)"
    lines = [header, "-" * len(header)]
    for r in rows:
        took = "" if r["duration_s"] is None else f"{r['duration_s']:.0f}s"
        cached = f"{len(r['cached_steps'])}/{r['steps']}"
        version = f"{r['model']} {r['model_version']} ({r['stage']})" if r["model_version"] else "-"
        if r["failed_steps"]:
            version += f"  failed at {', '.join(r['failed_steps'])}"
        lines.append(f"{r['run'][:40]:<40} {r['status']:<10} {r['created'][:19]:<19} {took:>8} {cached:>7}  {version}")
    return lines
