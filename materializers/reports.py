"""Reports (validation, preflight, plan, metrics) as JSON, with a Markdown view for the dashboard."""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar, Dict, Tuple, Type

from pydantic import BaseModel
from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.pydantic_materializer import PydanticMaterializer

from lorapipe.data.validation import RejectedRows, ValidationReport
from lorapipe.evaluation.metrics import EvalMetrics
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.hardware.probe import HardwareProbe


def token_length_histogram_png(report: ValidationReport) -> bytes:
    """Token lengths of the accepted rows, with the sequence limit where rows get cut."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = report.token_stats
    starts = [b[0] for b in stats.histogram]
    width = (starts[1] - starts[0]) if len(starts) > 1 else 1
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(starts, [b[1] for b in stats.histogram], width=width * 0.9, align="edge", color="#4c72b0")
    ax.axvline(stats.p95, color="#dd8452", linestyle="--", label=f"p95 {stats.p95:.0f}")
    ax.set_xlabel("tokens per row (after the chat template)")
    ax.set_ylabel("rows")
    ax.set_title(f"{stats.rows} rows, p50 {stats.p50:.0f}, max {stats.max}, {stats.truncated_rows} truncated")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class ReportMaterializer(PydanticMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (ValidationReport, RejectedRows, HardwareProbe, TrainingPlan,
                                                         PhasePlan, EvalMetrics)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save_visualizations(self, data: BaseModel) -> Dict[str, VisualizationType]:
        out: Dict[str, VisualizationType] = {}
        if isinstance(data, ValidationReport):
            body = "\n".join(["# Validation report", "", "```", *data.summary_lines(max_rows_per_kind=10), "```"])
            if data.token_stats and data.token_stats.histogram:
                png = os.path.join(self.uri, "token_lengths.png")
                with fileio.open(png, "wb") as fh:
                    fh.write(token_length_histogram_png(data))
                out[png] = VisualizationType.IMAGE
            if data.expectations and data.expectations.data_docs_html:
                html = os.path.join(self.uri, "great_expectations.html")
                with fileio.open(html, "w") as fh:
                    fh.write(data.expectations.data_docs_html)
                out[html] = VisualizationType.HTML
        else:
            body = f"# {type(data).__name__}\n\n```json\n{json.dumps(data.model_dump(mode='json'), indent=2)[:20000]}\n```"
        path = os.path.join(self.uri, "report.md")
        with fileio.open(path, "w") as fh:
            fh.write(body)
        out[path] = VisualizationType.MARKDOWN
        return out

    def extract_metadata(self, data: BaseModel) -> Dict[str, Any]:
        if isinstance(data, ValidationReport):
            return {"passed": data.passed, "rows_accepted": data.rows_accepted, "rows_rejected": data.rows_rejected,
                    "data_fingerprint": data.data_fingerprint}
        if isinstance(data, EvalMetrics):
            return {"base_perplexity": data.base.perplexity, "tuned_perplexity": data.tuned.perplexity,
                    "tuned_beats_base": data.tuned_beats_base}
        if isinstance(data, TrainingPlan):
            return {"backend": data.backend, "device": data.device, "dtype": data.dtype,
                    "micro_batch_size": data.micro_batch_size,
                    "gradient_accumulation_steps": data.gradient_accumulation_steps}
        if isinstance(data, PhasePlan):
            return {"phase": data.phase, "device": data.device, "dtype": data.dtype, "batch_size": data.batch_size}
        return {}
