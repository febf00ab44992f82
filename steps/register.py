"""Register: attach metrics, plan, fingerprints and versions to the Model Control Plane version; set its stage."""

import json
from pathlib import Path
from typing import Annotated, Optional, Tuple

from zenml import get_step_context, log_metadata, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger

from lorapipe.artifacts import AdapterFolder, ModelFolder
from lorapipe.config import RegisterSection
from lorapipe.data.sources import ResolvedData
from lorapipe.data.validation import ValidationReport
from lorapipe.evaluation.metrics import EvalMetrics
from lorapipe.hardware.memory import comparable_prediction_gib
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.hardware.preflight import PreflightReport
from lorapipe.hardware.probe import package_versions
from lorapipe.models.loading import TEMPLATE_RECORD
from lorapipe.registry import (
    StageHolderScores,
    VersionReport,
    decide_stage,
    git_commit,
    metric_rows,
    render_text,
)
from lorapipe.units import format_gib
from materializers import ReportMaterializer

logger = get_logger(__name__)


def _production_holder(model_name: str, this_version: str,
                       stage: str = "production") -> tuple[Optional[str], Optional[dict]]:
    """(version, metrics) of the version holding `stage` before this one registers, if any."""
    try:
        holder = Client().get_model_version(model_name, ModelStages(stage))
    except KeyError:
        return None, None
    if holder.name == this_version:
        return None, None
    return holder.name, holder.run_metadata.get("metrics")


def _same_inputs_version(model_name: str, this_version: str, data_sha: str, config_sha: str) -> Optional[str]:
    """An earlier version trained on the same data bytes with the same config, if any: a scheduled run that found
    no new data got every step from the cache, and must not take a stage as if it were news."""
    from zenml.utils.pagination_utils import depaginate_stream

    client = Client()
    for mv in depaginate_stream(client.list_model_versions, model=model_name, hydrate=True, size=100):
        if mv.name == this_version:
            continue
        meta = mv.run_metadata
        if meta.get("config_sha256") == config_sha and (meta.get("data") or {}).get("files_sha256") == data_sha:
            return mv.name
    return None


# a phase whose measured peak differs from the prediction by more than this is called out (issue 8)
MEMORY_WARN_FRACTION = 0.15


def _memory_facts(plan: TrainingPlan, adapter_meta: dict, metrics: EvalMetrics, check: dict,
                  evaluation_plan: Optional[PhasePlan] = None, merge_plan: Optional[PhasePlan] = None) -> dict:
    """Each phase's predicted and measured peak (GiB), side by side, with the relative error: what the memory model
    is checked against on every run, in the measured quantity (`predicted_in_process_gib`): on CUDA torch's allocated
    peak (no context or allocator overhead); on the CPU re-based on what the step's process already held when the
    phase began (ZenML, the earlier steps' data). A phase off by more than 15% is logged as a warning."""
    trained = adapter_meta.get("result", {})
    facts = {"train": {"predicted_gib": plan.memory.total_gib, "measured_gib": trained.get("peak_memory_gib"),
                       "resident_at_start_gib": trained.get("resident_at_start_gib"), "device": plan.device},
             "evaluate": {"predicted_gib": evaluation_plan.predicted_peak_gib if evaluation_plan else None,
                          "measured_gib": metrics.memory_gib, "resident_at_start_gib": metrics.memory_at_start_gib,
                          "device": evaluation_plan.device if evaluation_plan else None},
             "merge": {"predicted_gib": merge_plan.predicted_peak_gib if merge_plan else None,
                       "measured_gib": check.get("memory_gib"),
                       "resident_at_start_gib": check.get("memory_at_start_gib"),
                       "device": "cpu"}}
    for phase, row in facts.items():
        predicted, measured = row.get("predicted_gib"), row.get("measured_gib")
        if not predicted or not measured:
            row["error"] = None
            continue
        terms = {"train": plan.memory.terms, "evaluate": evaluation_plan.memory_terms if evaluation_plan else [],
                 "merge": merge_plan.memory_terms if merge_plan else []}[phase]
        here = comparable_prediction_gib(terms, row.get("device") or "cpu", row.get("resident_at_start_gib")) \
            if terms else predicted
        row["predicted_in_process_gib"] = round(here, 4)
        row["error"] = round(here / measured - 1, 4)
        if abs(row["error"]) > MEMORY_WARN_FRACTION:
            logger.warning("memory: %s peaked at %s, predicted %s in this process (%+.0f%%): the memory model is off "
                           "for this run; see docs/MEMORY.md", phase, format_gib(measured), format_gib(here),
                           row["error"] * 100)
    return facts


def _pin_evaluation(context) -> None:
    """Pin the evaluation view to the run's page (ZenML 0.98 curates visualizations on runs, pipelines, snapshots
    and deployments, not on model versions)."""
    from zenml.enums import VisualizationResourceTypes

    metrics_inputs = context.inputs.get("eval_metrics") or []
    views = [v for v in (metrics_inputs[0].visualizations or []) if v.uri.endswith(".html")] if metrics_inputs else []
    if not views:
        return
    try:
        Client().create_curated_visualization(views[0].id, resource_id=context.pipeline_run.id,
                                              resource_type=VisualizationResourceTypes.PIPELINE_RUN,
                                              display_name="Evaluation: base vs tuned vs stage holder")
    except Exception as exc:  # noqa: BLE001 - a dashboard nicety must not fail a registration
        logger.warning("could not pin the evaluation view to the run: %s", exc)


@step(enable_cache=False, output_materializers={"model_version_report": ReportMaterializer})
def register_model(
    adapter: AdapterFolder, eval_metrics: EvalMetrics, merged_model: ModelFolder, training_plan: TrainingPlan,
    validation_report: ValidationReport, preflight_report: PreflightReport, register: RegisterSection, seed: int,
    resolved_data: ResolvedData, config_sha256: str, stage_holder_scores: StageHolderScores,
    evaluation_plan: Optional[PhasePlan] = None, merge_plan: Optional[PhasePlan] = None,
) -> Tuple[Annotated[str, "model_stage"], Annotated[VersionReport, "model_version_report"]]:
    """Log the lineage facts on the model version and promote it when the tuned model beats the base.

    Args:
        adapter: the adapter (its metadata names the base model and revision).
        eval_metrics: base vs tuned metrics.
        merged_model: the merged model and its logits check.
        training_plan: the plan that trained it.
        validation_report: gives the validated data's fingerprint.
        preflight_report: the preflight checks and the machine it trained on.
        register: the config's `register` section.
        seed: the run's seed.
        resolved_data: the files read and the sha256 of their bytes.
        stage_holder_scores: the version holding the target stage, scored on this run's test rows.
        evaluation_plan: the evaluation phase's plan (its predicted peak is set beside the measured one).
        merge_plan: the merge phase's plan (likewise).
        config_sha256: sha256 of the validated config.

    Returns:
        The stage set ("none" when not promoted), and the model version's report (shown in the dashboard as the
        page the open-source dashboard has no room for; `lorapipe lineage` prints the same).
    """
    r = register
    check = merged_model.metadata.get("check", {})
    holder = stage_holder_scores
    stage, reason = decide_stage(eval_metrics, bool(check.get("passed")), r.stage_if_better, r.margin,
                                 r.primary_metric, r.min_stop_rate, holder, check.get("serving_parity"))
    if stage and holder.scores is not None:
        this = get_step_context().model
        now, _ = _production_holder(this.name, str(this.version), stage)
        if now != holder.version:  # another run promoted a version while this one was being scored
            stage, reason = None, (f"the {stage} holder changed during this run (scored {holder.version}, now "
                                   f"{now}): run again to compare with it")
    adapter_meta = adapter.metadata
    context = get_step_context()
    model = context.model
    data_files_sha256 = resolved_data.sha256
    same_as = _same_inputs_version(model.name, str(model.version), data_files_sha256, config_sha256)
    if same_as:
        stage, reason = None, (f"unchanged: the same data (sha256 {data_files_sha256[:12]}) and config as version "
                               f"{same_as}; nothing was retrained, so no stage moves")
    base, tuned = eval_metrics.base, eval_metrics.tuned
    metrics = {"base_loss": base.loss, "tuned_loss": tuned.loss}
    if eval_metrics.classification is None:  # a classifier's loss is the label's cross-entropy: no perplexity
        metrics.update(base_perplexity=base.perplexity, tuned_perplexity=tuned.perplexity,
                       perplexity_gain=eval_metrics.perplexity_gain)
    for name in ("rouge_l", "exact_match", "bleu", "chrf", "stop_rate", "overshoot",  # absent when not measured
                 "accuracy", "macro_f1", "weighted_f1", "ece"):
        if getattr(tuned, name, None) is not None:
            metrics[f"base_{name}"], metrics[f"tuned_{name}"] = getattr(base, name), getattr(tuned, name)
    if eval_metrics.classification is not None:  # "base" is the untuned model; the majority class beside it
        c = eval_metrics.classification
        metrics["untuned_baseline"] = c.untuned
        for name in ("accuracy", "macro_f1", "weighted_f1"):
            metrics[f"majority_{name}"] = c.reports["majority"][name]
    holder_metrics = None
    if holder.scores is not None:
        holder_metrics = {f"holder_{k}": v for k, v in holder.scores.items() if isinstance(v, (int, float))}
        metrics.update(holder_metrics)
        metrics["holder_version"] = holder.version
    data = {"files_sha256": data_files_sha256, "source": resolved_data.source, "files": resolved_data.files,
            "validated_sha256": validation_report.data_fingerprint,
            "train_split_sha256": adapter_meta.get("data_fingerprint", ""),
            "rows_accepted": validation_report.rows_accepted, "rows_rejected": validation_report.rows_rejected,
            # each file's own sha256 (lineage finds a version by one file of several) and, for a mixture, each
            # source's files, sha256, rows drawn and share
            "file_sha256": resolved_data.file_sha256,
            "sources": [{"name": c.name, "sha256": c.sha256, "files": c.files, "weight": c.weight,
                         "max_rows": c.max_rows, "rows_accepted": c.rows_accepted, "rows_sampled": c.rows_sampled,
                         "share": c.share} for c in validation_report.sources]}
    if validation_report.rows_sampled is not None:
        data["rows_sampled"] = validation_report.rows_sampled
    base_model = {"name_or_path": adapter_meta.get("base_model", ""),
                  "revision": adapter_meta.get("base_revision") or ""}
    if adapter_meta.get("base_registered_version"):  # e.g. a preference run on top of a registered SFT version
        base_model["registered_version"] = adapter_meta["base_registered_version"]
    code = git_commit()
    template_record = Path(merged_model.path) / TEMPLATE_RECORD
    chat_template = json.loads(template_record.read_text()) if template_record.is_file() else {}
    if holder_metrics is not None:  # scored on this run's rows
        holder_version, shown_holder = holder.version, holder_metrics
    else:  # no holder to score: the production holder's own figures, if one exists
        holder_version, shown_holder = _production_holder(model.name, str(model.version))
    report = VersionReport(
        model=model.name, version=str(model.version), stage=stage or "none", decision=reason,
        metrics=metric_rows(metrics, shown_holder), production_version=holder_version, data=data,
        base_model=base_model, merge_check=check, code=code, chat_template=chat_template,
        run={"id": str(context.pipeline_run.id), "name": context.pipeline_run.name},
        artifacts={name: str(inputs[0].id) for name, inputs in sorted(context.inputs.items()) if inputs},
    )
    log_metadata(infer_model=True, metadata={
        "metrics": metrics,
        "plan": training_plan.model_dump(mode="json", exclude={"memory"}),
        "data": data,
        "base_model": base_model,
        "training": adapter_meta.get("result", {}),
        "merge_check": check,
        "chat_template": chat_template,
        "seed": seed,
        "config_sha256": config_sha256,
        "package_versions": {k: v or "not installed" for k, v in package_versions().items()},
        "code": code,
        "machine": {"cpu_count": preflight_report.cpu_count, "ram_total_gib": preflight_report.ram_total_gib,
                    "cuda": [d.name for d in preflight_report.cuda_devices]},
        "stage_decision": reason,
        "memory": _memory_facts(training_plan, adapter_meta, eval_metrics, check, evaluation_plan, merge_plan),
        "report": report.model_dump(mode="json"),
    })
    if stage:
        model.set_stage(stage, force=True)  # the previous holder is archived, not deleted
    _pin_evaluation(context)
    for line in render_text(report):
        logger.info(line)
    return stage or "none", report
