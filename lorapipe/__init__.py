"""lorapipe: the plain library behind validated, trained, evaluated, merged and registered LoRA/QLoRA fine-tunes.

It needs neither ZenML nor click: `steps/`, `pipelines/` and `materializers/` are thin ZenML wrappers over it, and
`lorapipe_app` (the CLI and the Python API, `from lorapipe_app import run_finetune`) sits on top of both.
"""

# first: its exit handler must be registered before any library's, so that it runs after all of them
import lorapipe.short_lived  # noqa: F401

__version__ = "0.1.0"
