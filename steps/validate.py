"""Validate the data: every row problem with file and line, the audit, the GE suite."""

import tempfile
from pathlib import Path
from typing import Annotated, Optional, Tuple

from zenml import save_artifact, step
from zenml.logger import get_logger

from lorapipe.config import DataSection, ModelSection, ValidationSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.formats import LabelFields
from lorapipe.data.sources import ResolvedData
from lorapipe.data.validation import (
    DataValidationError,
    RejectedRows,
    ValidationReport,
    validate_dataset,
)
from materializers import ConversationDatasetMaterializer, ReportMaterializer
from steps.caching import library_cache_policy
from steps.data_source import local_files, source_inputs

logger = get_logger(__name__)
# where an artifact's rows are written again when this step runs in a container of its own
ARTIFACT_ROWS_DIR = Path(tempfile.gettempdir()) / "lorapipe"


@step(output_materializers={"validated_dataset": ConversationDatasetMaterializer,
                            "validation_report": ReportMaterializer, "rejected_rows": ReportMaterializer},
      cache_policy=library_cache_policy(__file__))
def validate_data(
    resolved_data: ResolvedData, data: DataSection, validation: ValidationSection, model: ModelSection,
    max_seq_length: int, micro_batch_sizes: list[int], group_key: Optional[str] = None,
    stratify_key: Optional[str] = None, kto_weights: Optional[list[float]] = None, mixture_seed: Optional[int] = None,
) -> Tuple[
    Annotated[ConversationDataset, "validated_dataset"],
    Annotated[ValidationReport, "validation_report"],
    Annotated[RejectedRows, "rejected_rows"],
]:
    """Read, check and audit the dataset; fail with the full list of problems when it is bad.

    Args:
        resolved_data: the files to read and their sha256 (the content, not the artifact, keys the cache: an
            unchanged drop is served from the cache).
        data: the config's `data` section (format, keys, labels).
        validation: the config's `validation` section (policies for bad and over-long rows).
        model: the config's `model` section; its tokenizer and chat template drive the audit.
        max_seq_length: train.max_seq_length, the limit rows are checked against.
        micro_batch_sizes: the micro-batch sizes the plan may choose; the padding waste of each is reported.
        group_key: split.group_key, the row field read to keep a group's rows in one split.
        stratify_key: split.stratify_key, the row field (a class label) read for stratified splitting.
        kto_weights: train.method kto: train.preference's desirable and undesirable weights, which KTO's balance
            check applies (None: other methods, unweighted).
        mixture_seed: data.sources with weights or max_rows: the run's seed, which draws the mixture's rows (None:
            nothing is sampled, so the seed is not in this step's cache key).

    Returns:
        The accepted rows, the validation report and the rejected rows (original text, file, line).
    """
    from lorapipe.models.loading import load_tokenizer

    m, d, v = model, data, validation
    tokenizer = load_tokenizer(m.name_or_path, m.revision, m.trust_remote_code, m.chat_template,
                               m.chat_template_kwargs)
    outcome = validate_dataset(
        local_files(resolved_data, d, ARTIFACT_ROWS_DIR), d.format, d.prompt_key, d.completion_key,
        sources=source_inputs(resolved_data, d), mixture_rows=d.mixture_rows, seed=mixture_seed or 0,
        reasoning=d.reasoning,
        tokenizer=tokenizer, max_seq_length=max_seq_length, overlength=v.overlength, on_bad_rows=v.on_bad_rows,
        max_bad_fraction=v.max_bad_fraction, min_rows=v.min_rows, micro_batch_sizes=micro_batch_sizes,
        group_key=group_key, stratify_key=stratify_key, progress=True,
        label_fields=LabelFields.from_config(d.text_key, d.text_pair_key, d.label_key, d.labels),
        max_class_imbalance=v.max_class_imbalance, kto_weights=tuple(kto_weights or (1.0, 1.0)),
    )
    for line in outcome.report.summary_lines():
        logger.info(line)
    rejected = RejectedRows(rows=outcome.rejected)
    if not outcome.report.passed:
        # A failed step stores no outputs: keep the report and every rejected row in the store first.
        save_artifact(outcome.report, name="validation_report", materializer=ReportMaterializer)
        save_artifact(rejected, name="rejected_rows", materializer=ReportMaterializer)
        raise DataValidationError(outcome.report)
    # the report already hashed the accepted rows: reuse it rather than hash every row again
    validated = ConversationDataset(outcome.records, "validated", fingerprint=outcome.report.data_fingerprint)
    return validated, outcome.report, rejected
