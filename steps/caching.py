"""The steps' cache policy: ZenML's default key (the step's own code, parameters and inputs' content) plus every
library file the step can run, so a change to lorapipe's code re-runs the steps that use it (and those after)."""

from typing import Any

from zenml.config import CachePolicy

from lorapipe.code_version import dependency_files


def library_cache_policy(step_file: str, **options: Any) -> CachePolicy:
    """`step_file`: the step module's `__file__`. Paths are relative to the repository, ZenML's source root."""
    return CachePolicy(file_dependencies=dependency_files(step_file), **options)
