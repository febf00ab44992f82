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
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.hardware.probe import HardwareProbe


class ReportMaterializer(PydanticMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (ValidationReport, RejectedRows, HardwareProbe, TrainingPlan, EvalMetrics)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save_visualizations(self, data: BaseModel) -> Dict[str, VisualizationType]:
        if isinstance(data, ValidationReport):
            body = "\n".join(["# Validation report", "", "```", *data.summary_lines(max_rows_per_kind=10), "```"])
        else:
            body = f"# {type(data).__name__}\n\n```json\n{json.dumps(data.model_dump(mode='json'), indent=2)[:20000]}\n```"
        path = os.path.join(self.uri, "report.md")
        with fileio.open(path, "w") as fh:
            fh.write(body)
        return {path: VisualizationType.MARKDOWN}

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
        return {}
