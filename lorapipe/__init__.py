"""lorapipe: validated, trained, evaluated, merged and registered LoRA/QLoRA fine-tunes.

The library needs no ZenML; `steps/` and `pipelines/` are thin wrappers over it. `run_finetune` and
`schedule_finetune` (lorapipe.api) trigger the pipeline from Python; they are imported on first use, so
`import lorapipe` stays light.
"""

__version__ = "0.1.0"
__all__ = ["run_finetune", "schedule_finetune", "FinetuneResult"]


def __getattr__(name: str):
    if name in __all__:
        from lorapipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorapipe' has no attribute {name!r}")
