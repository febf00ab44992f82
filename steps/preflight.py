"""Hardware preflight: probe the machine, check everything a run needs, and decide the plan of every phase, or
refuse with every reason."""

import tempfile
from typing import Annotated, Optional, Tuple

from zenml import step
from zenml.client import Client
from zenml.logger import get_logger

from lorapipe.config import (
    EvaluateSection,
    MergeSection,
    ModelSection,
    PreflightSection,
    TrainSection,
)
from lorapipe.data.validation import ValidationReport
from lorapipe.hardware.plan import PhasePlan, TrainingPlan, decide_plan, model_size
from lorapipe.hardware.preflight import PreflightReport, RecommendedConfig, build_report
from lorapipe.hardware.probe import machine_fingerprint, probe
from lorapipe.phases.measure import probe_checks
from lorapipe.units import format_gib
from materializers import ReportMaterializer
from steps.caching import library_cache_policy

logger = get_logger(__name__)


# The machine is an input of the plan: its fingerprint is in the cache key, so the same config on another machine
# (other GPUs, RAM, packages) is planned again, and on this one the plan is served from the cache.
@step(output_materializers={"preflight_report": ReportMaterializer, "recommended_config": ReportMaterializer,
                            "training_plan": ReportMaterializer, "evaluation_plan": ReportMaterializer,
                            "merge_plan": ReportMaterializer, "base_evaluation_plan": ReportMaterializer},
      cache_policy=library_cache_policy(__file__, cache_func=machine_fingerprint))
def preflight(
    validation_report: ValidationReport, model: ModelSection, train: TrainSection, evaluate: EvaluateSection,
    merge: MergeSection, preflight: PreflightSection, task: str, user_set: Optional[list[str]] = None,
) -> Tuple[
    Annotated[PreflightReport, "preflight_report"],
    Annotated[RecommendedConfig, "recommended_config"],
    Annotated[TrainingPlan, "training_plan"],
    Annotated[PhasePlan, "evaluation_plan"],
    Annotated[PhasePlan, "merge_plan"],
    Annotated[PhasePlan, "base_evaluation_plan"],
]:
    """Probe CPU/RAM/disk, CUDA and Apple/MLX and the installed packages; decide every phase's plan in one function.

    Each phase's plan is its own artifact, so a change that affects only evaluation leaves the training plan's
    content, and so the cached training, as it was.

    Args:
        validation_report: the data's token statistics (checked against the sequence length).
        model: the config's `model` section (its config is read for the model's facts; no weights load).
        train: the config's `train` section.
        evaluate: the config's `evaluate` section (the evaluation batch).
        merge: the config's `merge` section (the merged weights' precision).
        preflight: the config's `preflight` section (`probe: true` measures a few real steps first).
        task: the config's `task` (lorapipe.catalog.TASKS): sft (a causal LM) or classification (a sequence
            classifier whose labels are the validation report's label set).
        user_set: the dotted keys the config set; with `train.profile` the plan chooses the others.

    Returns:
        The preflight report (every check), the recommended config fragment, the training, evaluation and merge
        plans, and the evaluation plan of the untuned base alone (its own artifact: the same for every adapter on
        that base, so the base's scores stay cached across retraining).
    """
    m, t, e, mg = model, train, evaluate, merge
    hw = probe(t.output_root)
    num_labels, labels = 2, []
    if task == "classification":
        # the label set validation froze (ids 0..n-1): the head's size and names, decided once, carried by the plan
        if validation_report.classification is None:
            raise ValueError("task: classification, but the validation report carries no label set: the data was "
                             "validated as another task")
        labels = validation_report.classification.labels
        num_labels = len(labels)
    pref = validation_report.preference
    if task == "preference" and pref is not None and t.method in ("dpo", "orpo") and not pref.pairs and \
            (pref.desirable or pref.undesirable):
        from lorapipe.hardware.plan import PlanError

        raise PlanError([f"train.method {t.method} trains on chosen/rejected pairs, and the data holds unpaired "
                         f"feedback ({pref.desirable} desirable, {pref.undesirable} undesirable answers): set "
                         "train.method: kto, or give pairs"])
    facts = model_size(m.name_or_path, m.revision, m.trust_remote_code, task=task, num_labels=num_labels)
    template = validation_report.template
    if template is not None and template.added_tokens:
        # a built-in chat template's new tokens: the embeddings grow to the tokenizer and their rows train (the plan
        # counts them, and refuses a backend that cannot train them)
        facts = facts.model_copy(update={"vocab_size": max(facts.vocab_size, template.tokenizer_size),
                                         "added_tokens": len(template.added_tokens)})
    plan = decide_plan(t, hw, facts, e, mg, attn_implementation=m.attn_implementation,
                       user_set=set(user_set) if user_set is not None else None, task=task, num_labels=num_labels)
    plan.train.labels = labels
    if task == "preference" and plan.train.method == "kto" and plan.train.micro_batch_size < 2:
        from lorapipe.hardware.plan import PlanError

        raise PlanError([f"train.method kto with a micro-batch of {plan.train.micro_batch_size}: TRL's KTO estimates "
                         "its KL term from the other answers of the same micro-batch, so it needs at least 2 (set "
                         "train.micro_batch_size: 2, and lower train.max_seq_length or set train.quantization: nf4 "
                         "if memory is short)"])
    stats = validation_report.token_stats
    if stats and stats.truncated_rows:
        plan.train.warnings.append(f"{stats.truncated_rows} row(s) are longer than "
                                   f"max_seq_length={plan.train.max_seq_length}")
    waste = stats.padding_at(plan.train.micro_batch_size) if stats else None
    if waste is not None:  # validation measured every micro-batch the plan could choose; this is the one it chose
        plan.train.reasons.append(f"padding waste {waste.summary()}")
    store = Client().active_stack.artifact_store.path
    report = build_report(hw, facts, None, plan, [], [], t.output_root, store if "://" not in store else None,
                          plan.train.backend)
    if plan.train.device != "cuda" and hw.ram_available_gib < plan.train.memory.total_gib:
        # said here, not in the plan: the plan must not change with what happens to be free this second
        logger.warning("plan: warning: about %s of memory is free now and training needs about %s: close other "
                       "programs, or expect swapping", format_gib(hw.ram_available_gib),
                       format_gib(plan.train.memory.total_gib))
    for r in plan.train.reasons + [f"warning: {w}" for w in plan.train.warnings]:
        logger.info("plan: %s", r)
    for phase in (plan.evaluate, plan.merge):
        logger.info("plan: %s on %s in %s, batch %d: %s", phase.phase, phase.device, phase.dtype, phase.batch_size,
                    phase.reason)
        for warning in phase.warnings:
            logger.warning("plan: %s: warning: %s", phase.phase, warning)
    if preflight.probe:
        with tempfile.TemporaryDirectory(prefix="probe-", dir=t.output_root) as work:
            checks, measured = probe_checks(m, t, plan, e, work)
        report.checks += checks
        report.probe_measurements = measured
        for c in checks:
            logger.info("probe: %s: %s (%s)", c.name, c.measured, c.status)
    failed = [c for c in report.checks if c.status == "fail"]
    if failed:
        from lorapipe.hardware.plan import PlanError

        raise PlanError([f"{c.name}: {c.measured}; needs {c.requirement}" + (f" ({c.detail})" if c.detail else "")
                         for c in failed])
    return (report, RecommendedConfig.from_plan(plan), plan.train, plan.evaluate, plan.merge,
            plan.evaluate.base_alone())
