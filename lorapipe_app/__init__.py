"""lorapipe's application: the `lorapipe` command (`lorapipe_app.cli`), the Python API that triggers and schedules the
pipeline (`run_finetune`, `schedule_finetune`), lineage, runs and watch. It sits above the ZenML pipeline, which
sits above the plain library (`lorapipe`); nothing below imports from here.

    from lorapipe_app import run_finetune
    result = run_finetune("configs/quickstart.yaml", overrides=["train.max_steps=20"])

The API is imported on first use, so `import lorapipe_app` stays light.
"""

import lorapipe  # noqa: F401  (first: lorapipe.short_lived's exit handler is registered before any library's)

__all__ = ["run_finetune", "schedule_finetune", "FinetuneResult"]


def __getattr__(name: str):
    if name in __all__:
        from lorapipe_app import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorapipe_app' has no attribute {name!r}")
