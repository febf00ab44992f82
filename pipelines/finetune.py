"""The fine-tuning DAG (eleven steps for sft, ten for classification). The function only wires steps; each step
gets only the config sections (typed, as the config validated them) and plans it reads, so a change to one section
re-runs that step and what follows it, and nothing before; what preflight decides (the micro-batch, each phase's
device, dtype and sequence length) reaches the steps after it through its plans, never guessed here."""

from typing import Optional

from zenml import pipeline
from zenml.client import Client

from lorapipe.catalog import task_spec
from lorapipe.config import LorapipeConfig
from lorapipe.hardware.plan import micro_batch_candidates
from steps import (
    evaluate_base_model,
    evaluate_model,
    find_stage_holder,
    merge_model,
    preflight,
    register_model,
    resolve_data_source,
    score_stage_holder,
    split_data,
    train_adapter,
    validate_data,
)


@pipeline
def finetune(config: LorapipeConfig, config_sha256: str, user_set: Optional[list[str]] = None) -> None:
    """resolve data -> validate -> preflight -> split -> (score the base) -> train -> evaluate -> merge -> score the
    stage holder -> register.

    Args:
        config: the validated config, paths made absolute.
        config_sha256: sha256 of the config, recorded on the model version.
        user_set: the dotted keys the config set (with `train.profile` the plan chooses the others).
    """
    train = config.train
    # resolved when the run starts (a schedule fires with the newest files); the sha256 of the bytes keys the cache
    resolved = resolve_data_source(data=config.data, output_root=train.output_root)
    dataset, report, _rejected = validate_data(
        resolved_data=resolved, data=config.data, validation=config.validation, model=config.model,
        max_seq_length=train.max_seq_length, micro_batch_sizes=micro_batch_candidates(train),
        group_key=config.split.group_key, stratify_key=config.split.stratify_key,
        kto_weights=([train.preference.desirable_weight, train.preference.undesirable_weight]
                     if config.task == "preference" and train.method == "kto" else None),
        mixture_seed=config.seed if any(s.weight or s.max_rows for s in config.data.sources) else None,
    )
    hardware, _recommended, plan, evaluation_plan, merge_plan, base_evaluation_plan = preflight(
        validation_report=report, model=config.model, train=train, evaluate=config.evaluate, merge=config.merge,
        preflight=config.preflight, task=config.task, user_set=user_set)
    train_split, eval_split, test_split = split_data(validated_dataset=dataset, training_plan=plan, split=config.split)
    # The stack decides tracking: with an experiment tracker (e.g. W&B) on the active stack, training logs to it.
    tracker = Client().active_stack.experiment_tracker
    train_step = train_adapter.with_options(experiment_tracker=tracker.name) if tracker else train_adapter
    adapter = train_step(train_split=train_split, eval_split=eval_split, training_plan=plan, model=config.model,
                         train=train, seed=config.seed)
    # the untuned base is scored apart, cached on the base, the test rows and the settings: not on the adapter
    base_scores = (evaluate_base_model(test_split=test_split, base_evaluation_plan=base_evaluation_plan,
                                       evaluate=config.evaluate, model=config.model, task=config.task,
                                       seed=config.seed)
                   if task_spec(config.task).scores_base_apart else None)
    metrics = evaluate_model(adapter=adapter, test_split=test_split, evaluation_plan=evaluation_plan,
                             evaluate=config.evaluate, model=config.model, seed=config.seed, base_scores=base_scores)
    merged = merge_model(adapter=adapter, test_split=test_split, merge_plan=merge_plan, merge=config.merge)
    # the version holding the target stage (looked up on every run: it changes between runs) and this run's merged
    # model, scored alike on the same test rows (cached on the holder's model, the rows and the settings)
    # looked up once the merged model exists, as close to the comparison as the pipeline allows
    stage_holder = find_stage_holder(register=config.register, task=config.task, after=merged)
    holder = score_stage_holder(stage_holder=stage_holder, merged_model=merged, test_split=test_split,
                                evaluation_plan=evaluation_plan, evaluate=config.evaluate, model=config.model,
                                seed=config.seed)
    register_model(adapter=adapter, eval_metrics=metrics, merged_model=merged, training_plan=plan,
                   validation_report=report, preflight_report=hardware, register=config.register,
                   evaluation_plan=evaluation_plan, merge_plan=merge_plan,
                   seed=config.seed, resolved_data=resolved, config_sha256=config_sha256,
                   stage_holder_scores=holder)
