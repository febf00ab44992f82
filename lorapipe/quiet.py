"""Library noise, avoided at its source: environment switches set before the libraries import, and the loggers
that speak at import time (torchao's optional CUDA kernels, torch's pytree deprecation notes, bitsandbytes' optional
CPU kernel, Great Expectations registering its API) turned down. Used by the CLI and by each data-parallel process."""

from __future__ import annotations

import logging
import os

NOISY_LOGGERS = {"torchao": logging.ERROR, "torch.utils._pytree": logging.ERROR,
                 "bitsandbytes.backends.cpu.ops": logging.ERROR, "great_expectations": logging.WARNING}


def quiet_env() -> None:
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # weave (wandb flavor) reports errors to its own service
    # datasets' map/filter bars are TRL's bookkeeping (truncating, dropping masked rows), not work to wait on
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def quiet_loggers() -> None:
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
