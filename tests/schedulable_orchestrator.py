"""A schedulable orchestrator for tests only: ZenML's real `Schedule` handling reaches it (the schedule is stored,
the snapshot compiled with it, the orchestrator asked to submit), and it records what it was asked and runs nothing.
No orchestrator that can schedule can run here (no cluster is reachable); this stands in for one at that boundary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Type

from zenml.orchestrators import (
    BaseOrchestrator,
    BaseOrchestratorConfig,
    BaseOrchestratorFlavor,
)
from zenml.orchestrators.base_orchestrator import SubmissionResult

FLAVOR = "lorapipe_recording"


class RecordingOrchestratorConfig(BaseOrchestratorConfig):
    record_file: str

    @property
    def is_schedulable(self) -> bool:
        return True

    @property
    def is_local(self) -> bool:
        return True


class RecordingOrchestrator(BaseOrchestrator):
    @property
    def config(self) -> RecordingOrchestratorConfig:
        return self._config  # type: ignore[return-value]

    def get_orchestrator_run_id(self) -> str:
        return "recording-orchestrator"

    def _record(self, entry: dict) -> None:
        path = Path(self.config.record_file)
        entries = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(entries + [entry], indent=2))

    def submit_pipeline(self, snapshot: Any, stack: Any, base_environment: Dict[str, str],
                        step_environments: Dict[str, Dict[str, str]],
                        placeholder_run: Optional[Any] = None) -> Optional[SubmissionResult]:
        schedule = snapshot.schedule
        self._record({
            "event": "submit", "snapshot_id": str(snapshot.id), "pipeline": snapshot.pipeline_configuration.name,
            "schedule": {"id": str(schedule.id), "name": schedule.name, "cron": schedule.cron_expression}
            if schedule else None,
            "steps": list(snapshot.step_configurations),
            "parameters": snapshot.pipeline_configuration.parameters,
            "model": snapshot.pipeline_configuration.model.model_dump(mode="json")
            if snapshot.pipeline_configuration.model else None,
            "step_settings": {name: {key: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
                                     for key, value in step.config.settings.items()}
                              for name, step in snapshot.step_configurations.items()},
            "placeholder_run": str(placeholder_run.id) if placeholder_run else None,
        })
        return SubmissionResult(metadata={"recorded_by": FLAVOR})

    def delete_schedule(self, schedule: Any) -> None:
        self._record({"event": "delete", "schedule": schedule.name})


class RecordingOrchestratorFlavor(BaseOrchestratorFlavor):
    @property
    def name(self) -> str:
        return FLAVOR

    @property
    def config_class(self) -> Type[RecordingOrchestratorConfig]:
        return RecordingOrchestratorConfig

    @property
    def implementation_class(self) -> Type[RecordingOrchestrator]:
        return RecordingOrchestrator
