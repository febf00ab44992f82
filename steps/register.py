"""Register: attach metrics, plan, fingerprints and versions to the Model Control Plane version; set its stage."""

from typing import Annotated

from zenml import get_step_context, log_metadata, step
from zenml.logger import get_logger

from lorapipe.artifacts import AdapterFolder, ModelFolder
from lorapipe.config import RegisterSection
from lorapipe.data.validation import ValidationReport
from lorapipe.evaluation.metrics import EvalMetrics
from lorapipe.hardware.plan import TrainingPlan
from lorapipe.hardware.probe import HardwareProbe, package_versions
from lorapipe.registry import decide_stage, git_commit

logger = get_logger(__name__)


@step(enable_cache=False)
def register_model(
    adapter: AdapterFolder, eval_metrics: EvalMetrics, merged_model: ModelFolder, training_plan: TrainingPlan,
    validation_report: ValidationReport, preflight_report: HardwareProbe, register: dict, seed: int,
    data_files_sha256: str, config_sha256: str,
) -> Annotated[str, "model_stage"]:
    """Log the lineage facts on the model version and promote it when the tuned model beats the base.

    Args:
        adapter: the adapter (its metadata names the base model and revision).
        eval_metrics: base vs tuned metrics.
        merged_model: the merged model and its logits check.
        training_plan: the plan that trained it.
        validation_report: gives the validated data's fingerprint.
        preflight_report: the machine it trained on.
        register: the config's `register` section.
        seed: the run's seed.
        data_files_sha256: sha256 of the data files as given.
        config_sha256: sha256 of the validated config.

    Returns:
        The stage set ("none" when not promoted).
    """
    r = RegisterSection(**register)
    check = merged_model.metadata.get("check", {})
    stage, reason = decide_stage(eval_metrics, bool(check.get("passed")), r.stage_if_better, r.min_perplexity_gain)
    adapter_meta = adapter.metadata
    log_metadata(infer_model=True, metadata={
        "metrics": {"base_perplexity": eval_metrics.base.perplexity, "tuned_perplexity": eval_metrics.tuned.perplexity,
                    "base_loss": eval_metrics.base.loss, "tuned_loss": eval_metrics.tuned.loss,
                    "perplexity_gain": eval_metrics.perplexity_gain,
                    "tuned_rouge_l": eval_metrics.tuned.rouge_l if eval_metrics.tuned.rouge_l is not None else -1.0,
                    "tuned_stop_rate": eval_metrics.tuned.stop_rate if eval_metrics.tuned.stop_rate is not None else -1.0},
        "plan": training_plan.model_dump(mode="json", exclude={"memory"}),
        "data": {"files_sha256": data_files_sha256, "validated_sha256": validation_report.data_fingerprint,
                 "train_split_sha256": adapter_meta.get("data_fingerprint", ""),
                 "rows_accepted": validation_report.rows_accepted, "rows_rejected": validation_report.rows_rejected},
        "base_model": {"name_or_path": adapter_meta.get("base_model", ""), "revision": adapter_meta.get("base_revision") or ""},
        "training": adapter_meta.get("result", {}),
        "merge_check": check,
        "seed": seed,
        "config_sha256": config_sha256,
        "package_versions": {k: v or "not installed" for k, v in package_versions().items()},
        "code": git_commit(),
        "machine": {"cpu_count": preflight_report.cpu_count, "ram_total_gb": preflight_report.ram_total_gb,
                    "cuda": [d.name for d in preflight_report.cuda_devices]},
        "stage_decision": reason,
    })
    model = get_step_context().model
    if stage:
        model.set_stage(stage, force=True)
    logger.info("model %s version %s: stage %s (%s)", model.name, model.version, stage or "none", reason)
    return stage or "none"
