"""lorapipe: validated, trained, evaluated, merged and registered LoRA/QLoRA fine-tunes.

The library needs no ZenML; `steps/` and `pipelines/` are thin wrappers over it.
"""

__version__ = "0.1.0"
