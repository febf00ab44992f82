"""The preflight report: every check before training (status, measured value, requirement) and the recommended
config, as the preflight step stores them and `lorapipe preflight --out DIR` writes them
(`preflight_report.json`, `recommended_config.json`).

Plain Python: the checks read the probe, the model's facts and the plan (or the plan's refusal); nothing here
trains. With `preflight.probe: true` the measured peaks of a few real steps (`lorapipe.phases.measure`) are added
as checks beside the predictions.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any, Literal, Optional

from pydantic import BaseModel

from lorapipe.hardware.facts import ModelFacts
from lorapipe.hardware.plan import RunPlan
from lorapipe.hardware.probe import HardwareProbe, free_bytes
from lorapipe.units import GIB, format_gib

Status = Literal["pass", "warn", "fail"]
MIN_PYTHON = (3, 10)
# Installed combinations known to break, each measured by this project: (package, condition on the probe's
# versions, what happens, the fix). Checked against the probe's package versions.
KNOWN_BAD: list[tuple[str, str, str]] = [
    ("torchvision", "a torchvision built for CUDA beside a CPU torch makes `import transformers` fail (pulled in by "
                    "unsloth and llamafactory installs)", "pip uninstall -y torchvision"),
    ("torchaudio", "a torchaudio wheel built for another torch fails to load", "pip uninstall -y torchaudio"),
]
UNSLOTH_CAPS = {"transformers": "5.17.0", "trl": "1.15.0"}  # unsloth 2026.10.9's upper pins, measured here


class Check(BaseModel):
    section: str  # python, packages, hardware, disk, model, data, plan, memory
    name: str
    status: Status
    measured: str
    requirement: str
    detail: str = ""


class PreflightReport(BaseModel):
    """Every preflight check, the machine and the plan's memory per phase: stored by the preflight step."""

    checks: list[Check]
    hardware: HardwareProbe
    model: Optional[ModelFacts] = None
    plan_reasons: list[str] = []
    probe_measurements: list[dict[str, Any]] = []

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("pass", "warn", "fail")}
        return f"{counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed"

    # what the register step and lineage read from the machine
    @property
    def cpu_count(self) -> int:
        return self.hardware.cpu_count

    @property
    def ram_total_gib(self) -> float:
        return self.hardware.ram_total_gib

    @property
    def cuda_devices(self) -> list:
        return self.hardware.cuda_devices


def _version_tuple(v: Optional[str]) -> tuple:
    parts = []
    for p in (v or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _broken_imports() -> list[tuple[str, str]]:
    """(package, error) for the KNOWN_BAD packages that are installed and do not import."""
    import importlib
    import importlib.util

    broken = []
    for module, _why, _fix in KNOWN_BAD:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what is reported
            broken.append((module, f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"))
    return broken


def package_checks(hw: HardwareProbe, backend: Optional[str]) -> list[Check]:
    checks = []
    py = sys.version_info[:2]
    checks.append(Check(section="python", name="python", status="pass" if py >= MIN_PYTHON else "fail",
                        measured=hw.python, requirement=f">= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}"))
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "unsloth", "mlx", "mlx_lm"):
        version = hw.packages.get(name)
        checks.append(Check(section="packages", name=name, status="pass", measured=version or "not installed",
                            requirement="needed by the chosen backend" if name in _needed(backend) else "optional",
                            detail="" if version or name not in _needed(backend) else "missing"))
        if name in _needed(backend) and not version:
            checks[-1].status = "fail"
    if hw.packages.get("unsloth"):
        for pkg, cap in UNSLOTH_CAPS.items():
            v = hw.packages.get(pkg)
            if v and _version_tuple(v) > _version_tuple(cap):
                checks.append(Check(section="packages", name=f"unsloth with {pkg}",
                                    status="fail" if backend == "unsloth" else "warn", measured=f"{pkg} {v}",
                                    requirement=f"{pkg} <= {cap} (unsloth's pin)",
                                    detail=f"pip install '{pkg}<={cap}'"))
    for module, error in _broken_imports():
        why, fix = next((w, f) for m, w, f in KNOWN_BAD if m == module)
        checks.append(Check(section="packages", name=f"{module} imports", status="fail", measured=error,
                            requirement="imports cleanly, or is not installed", detail=f"{why}; fix: {fix}"))
    return checks


def _needed(backend: Optional[str]) -> set[str]:
    from lorapipe.catalog import BACKENDS

    if backend not in BACKENDS:
        return {"torch", "transformers", "peft"}
    return {"torch", "transformers", "peft", *BACKENDS[backend].modules}


def disk_checks(paths: dict[str, str], need_gib: dict[str, float]) -> list[Check]:
    """Free space where each kind of output is written; one check per distinct filesystem location."""
    checks = []
    for what, path in paths.items():
        free = free_bytes(path) / GIB  # at the nearest folder that exists: outputs may not be there yet
        need = need_gib.get(what, 1.0)
        checks.append(Check(section="disk", name=f"free disk for {what}", status="pass" if free >= need else "fail",
                            measured=f"{format_gib(free)} free at {path}", requirement=f">= {format_gib(need)}",
                            detail="" if free >= need else f"free {format_gib(need - free)} there or move {what}"))
    return checks


def hardware_checks(hw: HardwareProbe, plan: Optional[RunPlan]) -> list[Check]:
    checks = [Check(section="hardware", name="CPU cores", status="pass", measured=str(hw.cpu_count),
                    requirement=">= 1"),
              Check(section="hardware", name="RAM", status="pass",
                    measured=f"{format_gib(hw.ram_total_gib)} total, {format_gib(hw.ram_available_gib)} available",
                    requirement="the CPU phases' peaks")]
    for d in hw.cuda_devices:
        checks.append(Check(section="hardware", name=f"GPU {d.index}", status="pass",
                            measured=f"{d.name}, capability {d.capability}, {format_gib(d.total_memory_gib)}, "
                                     f"bf16 {'yes' if d.bf16 else 'no'}", requirement="a CUDA device"))
    if hw.apple_silicon:
        checks.append(Check(section="hardware", name="Apple Silicon", status="pass",
                            measured=f"{format_gib(hw.ram_total_gib)} unified memory" + (
                                f", mlx working set {format_gib(hw.mlx_working_set_gib)}"
                                if hw.mlx_working_set_gib else ""),
                            requirement="-"))
    if plan is not None and plan.train.device != "cuda":
        need = plan.train.memory.total_gib
        ok = hw.ram_available_gib >= need
        checks[1] = checks[1].model_copy(update={
            "status": "pass" if ok else "warn", "requirement": f"{format_gib(need)} available for training",
            "detail": "" if ok else "close other programs, or expect swapping"})
    return checks


def plan_checks(plan: Optional[RunPlan], problems: list[str]) -> list[Check]:
    checks = [Check(section="plan", name="plan", status="fail", measured="refused", requirement="a plan that fits",
                    detail=p) for p in problems]
    if plan is None:
        return checks
    t = plan.train
    task = "" if t.num_labels is None else f"{t.task} ({t.num_labels} labels, train.method {t.method}), "
    checks.append(Check(section="plan", name="plan", status="pass",
                        measured=f"{task}{t.backend} on {t.device} in {t.dtype}, {t.quantization}, micro-batch "
                                 f"{t.micro_batch_size} x {t.gradient_accumulation_steps}",
                        requirement="every phase fits its budget"))
    phase_warnings = (("training", t.warnings), ("evaluation", plan.evaluate.warnings),
                      ("merge", plan.merge.warnings))
    for phase, found in phase_warnings:
        for w in found:
            checks.append(Check(section="plan", name=f"{phase} warning", status="warn", measured=w, requirement="-"))
    budget = t.memory.budget_gib
    for name, peak, where in (("training", t.memory.total_gib, t.device),
                              ("evaluation", plan.evaluate.predicted_peak_gib, plan.evaluate.device),
                              ("merge", plan.merge.predicted_peak_gib, "cpu")):
        checks.append(Check(section="memory", name=f"{name} peak (predicted)", status="pass",
                            measured=f"{format_gib(peak)} on {where}",
                            requirement=f"<= {format_gib(budget)}" if where == t.device else "fits the RAM budget"))
    return checks


def data_checks(paths: list[str]) -> list[Check]:
    """The data files (globs expanded) exist and are not empty; rows are counted by validation, not here."""
    checks = []
    for pattern in paths:
        matched = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        existing = [p for p in matched if os.path.isfile(p)]
        if not existing:
            checks.append(Check(section="data", name=pattern, status="fail", measured="no such file" if not any(
                ch in pattern for ch in "*?[") else "the pattern matches no file", requirement="a readable JSONL/JSON "
                "file", detail="fix data.paths"))
            continue
        size = sum(os.path.getsize(p) for p in existing)
        checks.append(Check(section="data", name=pattern, status="pass" if size else "fail",
                            measured=f"{len(existing)} file(s), {size / 2**20:.1f} MiB",
                            requirement="not empty"))
    return checks


class RecommendedConfig(BaseModel):
    """The plan's choices as a lorapipe config fragment (`recommended_config.json`), with why."""

    fragment: dict[str, Any]
    reasons: list[str]

    @classmethod
    def from_plan(cls, plan: RunPlan) -> "RecommendedConfig":
        return cls(fragment=recommended_config(plan), reasons=list(plan.train.reasons))


def recommended_config(plan: RunPlan) -> dict[str, Any]:
    """A config fragment with the plan's choices (merged over the user's config it reproduces this plan)."""
    t = plan.train
    fragment: dict[str, Any] = {"train": {
        "backend": t.backend, "device": t.device, "dtype": t.dtype, "quantization": t.quantization,
        "max_seq_length": t.max_seq_length, "micro_batch_size": t.micro_batch_size,
        "effective_batch_size": t.effective_batch_size, "gradient_checkpointing": t.gradient_checkpointing,
        "optimizer": t.optimizer}, "evaluate": {"batch_size": plan.evaluate.batch_size}}
    if t.method != "lora":
        fragment["train"]["method"] = t.method
    if t.world_size > 1:
        fragment["train"]["processes"] = t.world_size
    return fragment


def build_report(hw: HardwareProbe, facts: Optional[ModelFacts], model_error: Optional[str], plan: Optional[RunPlan],
                 problems: list[str], data_paths: list[str], output_root: str, artifact_store: Optional[str],
                 backend: Optional[str]) -> PreflightReport:
    checks = package_checks(hw, backend)
    checks += hardware_checks(hw, plan)
    if facts is not None:
        kind = "" if facts.num_labels is None else f" {facts.block} sequence classifier, {facts.num_labels} labels,"
        checks.append(Check(section="model", name="model config", status="pass",
                            measured=f"{facts.model_type},{kind} {facts.total_parameters / 1e6:,.1f} M parameters, "
                                     f"{facts.layers} layers, vocabulary {facts.vocab_size:,}",
                            requirement="a readable config.json"))
    else:
        checks.append(Check(section="model", name="model config", status="fail", measured="unreadable",
                            requirement="a readable config.json", detail=model_error or ""))
    model_gib = (facts.total_parameters * 2 / GIB) if facts else 1.0
    paths = {"checkpoints (train.output_root)": output_root}
    need = {"checkpoints (train.output_root)": 1.0 + model_gib * 0.05}
    if artifact_store:
        paths["the merged model (ZenML artifact store)"] = artifact_store
        need["the merged model (ZenML artifact store)"] = 1.0 + model_gib
    checks += disk_checks(paths, need)
    checks += data_checks(data_paths)
    checks += plan_checks(plan, problems)
    return PreflightReport(checks=checks, hardware=hw, model=facts,
                           plan_reasons=list(plan.train.reasons) if plan else [])
