"""What the register step writes on a model version, and the rule that sets its stage (no ZenML here)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from lorapipe.evaluation.metrics import EvalMetrics


def git_commit(repo_dir: str | Path = ".") -> dict:
    """The code's commit and whether the tree had uncommitted changes (reproducibility, like the seed notebook)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    if sha.returncode != 0:
        return {"commit": "unknown", "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# metric -> (ModelScores field, lower is better)
PRIMARY_METRICS = {"perplexity": ("perplexity", True), "loss": ("loss", True), "rouge_l": ("rouge_l", False),
                   "exact_match": ("exact_match", False), "bleu": ("bleu", False), "chrf": ("chrf", False),
                   "stop_rate": ("stop_rate", False), "accuracy": ("accuracy", False),
                   "macro_f1": ("macro_f1", False), "weighted_f1": ("weighted_f1", False),
                   "preference_accuracy": ("preference_accuracy", False), "chosen_loss": ("chosen_loss", True)}


class StageHolder(BaseModel):
    """Which version holds the target stage as this run starts (looked up on every run: it changes between runs), and
    the merged model to score; its content keys the scoring's cache, so a holder is scored once per test split and
    evaluation settings. `version` is None when no other version holds the stage (`note` says why)."""

    stage: str
    version: Optional[str] = None
    merged_model_id: Optional[str] = None  # the holder's merged_model artifact version
    note: str = ""  # why there is nothing to score
    comparable: bool = True  # False: another task under the same model name


class StageHolderScores(BaseModel):
    """The version holding the target stage before this run registers, scored on this run's test rows (cached on the
    holder's merged model, the rows and the evaluation settings). `scores` is None when no other version holds the
    stage."""

    stage: str
    version: Optional[str] = None
    scores: Optional[dict[str, Optional[float]]] = None  # ModelScores fields: perplexity, loss, rouge_l, ...
    # this run's merged model scored by the same code on the same rows: the holder is a merged model too, so the
    # comparison is like for like (the evaluate step scores base + adapter, which rounding makes differ slightly)
    candidate: Optional[dict[str, Optional[float]]] = None
    note: str = ""  # why there is nothing to compare with, or what was scored
    # False: the holder cannot be compared with this run's model (another task under the same model name): no stage
    comparable: bool = True


def improvement(new: float, old: float, lower_is_better: bool) -> float:
    """Relative improvement of `new` over `old` (positive = better), e.g. perplexity 8 over 10 -> 0.2."""
    if old == 0:
        return 0.0 if new == old else (float("inf") if (new < old) == lower_is_better else float("-inf"))
    gain = (old - new) / abs(old)
    return gain if lower_is_better else -gain


def decide_stage(metrics: EvalMetrics, merge_passed: bool, stage_if_better: str, margin: float,
                 primary_metric: str = "perplexity", min_stop_rate: float = 0.0,
                 holder: Optional[StageHolderScores] = None,
                 serving_parity: Optional[dict] = None) -> tuple[Optional[str], str]:
    """(stage or None, reason). Promote only when the tuned model passes the merge check, learned to stop often
    enough, and beats the base and the stage's current holder on the primary metric by `margin` (relative)."""
    if stage_if_better == "none":
        return None, "register.stage_if_better is 'none'"
    if not merge_passed:
        return None, "the merged model failed its logits check"
    if serving_parity is not None and not serving_parity.get("passed", True):
        return None, f"the merged model as served answers differently from its adapter: {serving_parity['reason']}"
    if holder is not None and not holder.comparable:
        return None, holder.note
    field, lower = PRIMARY_METRICS[primary_metric]
    tuned, base = getattr(metrics.tuned, field, None), getattr(metrics.base, field, None)
    if any(v is not None and not math.isfinite(v) for v in (tuned, base)):
        return None, (f"{primary_metric} is not a finite number (base {base}, tuned {tuned}): nothing can be "
                      "compared; look at the evaluation report")
    if tuned is None or base is None:
        return None, (f"register.primary_metric={primary_metric} was not measured (no generations were scored): "
                      "set evaluate.generation_samples > 0, or promote on perplexity")
    stop_rate = metrics.tuned.stop_rate
    if min_stop_rate > 0 and (stop_rate is None or stop_rate < min_stop_rate):
        shown = "not measured" if stop_rate is None else f"{stop_rate:.0%}"
        return None, (f"learned-to-stop rate {shown} is below register.min_stop_rate={min_stop_rate:.0%}: the "
                      "model does not end its answers")
    direction = "lower" if lower else "higher"
    # a classifier's "base" is its untuned baseline; it must also beat every other baseline (the majority class)
    baselines = {"base": base}
    if metrics.classification is not None:
        names = {"majority": "the majority class", "head_only": "the head-only baseline (untuned model)"}
        baselines = {names.get(n, n): metrics.classification.reports[n].get(field) for n in
                     metrics.classification.baselines}
    for name, value in baselines.items():
        if value is None:
            continue
        over_base = improvement(tuned, value, lower)
        if over_base <= 0 or over_base < margin:
            return None, (f"tuned {primary_metric} {tuned:.4g} does not beat {name} {value:.4g} by register.margin="
                          f"{margin:.1%} ({direction} is better; {over_base:+.1%})")
    reason = f"tuned {primary_metric} {tuned:.4g} beats " + ", ".join(
        f"{name} {value:.4g} ({improvement(tuned, value, lower):+.1%})" for name, value in baselines.items()
        if value is not None)
    if holder is not None and holder.scores is not None:
        held = holder.scores.get(field)
        if holder.candidate is not None and holder.candidate.get(field) is not None:
            tuned = holder.candidate[field]  # this version's merged model, scored as the holder was
        if held is not None and not math.isfinite(held):
            return None, (f"the {holder.stage} holder {holder.version} scored {primary_metric} {held} on these rows: "
                          "not comparable; it keeps the stage")
        if held is not None:
            over_holder = improvement(tuned, held, lower)
            if over_holder <= 0 or over_holder < margin:
                return None, (f"tuned {primary_metric} {tuned:.4g} does not beat version {holder.version}, which "
                              f"holds {holder.stage}, at {held:.4g} on the same test rows by register.margin="
                              f"{margin:.1%} ({direction} is better; {over_holder:+.1%}); {holder.version} keeps "
                              f"{holder.stage}")
            reason += f" and version {holder.version}, the {holder.stage} holder, at {held:.4g} ({over_holder:+.1%})"
    elif holder is not None and holder.note:
        reason += f"; {holder.note}"
    return stage_if_better, reason


class VersionReport(BaseModel):
    """What a model version is and why it holds its stage: written by the register step (an artifact with an HTML
    view, and the version's metadata) and printed by `lorapipe lineage`, so both say the same."""

    model: str
    version: str
    stage: str  # set at registration ("none" when not promoted)
    decision: str  # why that stage
    metrics: list[dict[str, Any]]  # per metric: name, base, tuned, production (the holder's, when there is one)
    production_version: Optional[str] = None  # the production holder at registration, if any
    data: dict[str, Any]
    base_model: dict[str, Any]
    merge_check: dict[str, Any]
    code: dict[str, Any]
    # what every render used: the template's origin, sha256 and switches (lorapipe_template.json of the merged model)
    chat_template: dict[str, Any] = {}
    run: dict[str, str]  # id and name of the pipeline run
    artifacts: dict[str, str]  # artifact name -> artifact version id


METRIC_ROWS = (("perplexity", "base_perplexity", "tuned_perplexity"), ("loss", "base_loss", "tuned_loss"),
               ("ROUGE-L", "base_rouge_l", "tuned_rouge_l"), ("exact match", "base_exact_match", "tuned_exact_match"),
               ("BLEU", "base_bleu", "tuned_bleu"), ("chrF", "base_chrf", "tuned_chrf"),
               ("stop rate", "base_stop_rate", "tuned_stop_rate"),
               # task: classification: "base" is the untuned model (the head trained alone, else the majority class)
               ("accuracy", "base_accuracy", "tuned_accuracy"), ("macro F1", "base_macro_f1", "tuned_macro_f1"),
               ("weighted F1", "base_weighted_f1", "tuned_weighted_f1"), ("ECE", "base_ece", "tuned_ece"))


def metric_rows(metrics: dict[str, float], production: Optional[dict[str, float]]) -> list[dict[str, Any]]:
    """Base vs tuned for each metric the version recorded, and the stage holder's figure: scored on this run's test
    rows (`holder_<metric>` keys) when the register step had it, else as the holder recorded it itself
    (`tuned_<metric>`, on its own split; versions registered before 2026-11-29 wrote -1 for "not measured")."""
    def measured(value: Any) -> Any:
        return None if value is None or (isinstance(value, (int, float)) and value < 0) else value

    rows = []
    for name, base_key, tuned_key in METRIC_ROWS:
        if tuned_key not in metrics:
            continue
        rows.append({"metric": name, "base": metrics.get(base_key), "tuned": metrics[tuned_key],
                     "production": measured((production or {}).get(tuned_key.replace("tuned_", "holder_"),
                                                                   (production or {}).get(tuned_key)))})
    return rows


def render_text(report: VersionReport, current_stage: Optional[str] = None) -> list[str]:
    stage = report.stage if current_stage is None or current_stage == report.stage else \
        f"{current_stage} (at registration: {report.stage})"
    lines = [f"model {report.model} version {report.version} (stage: {stage})",
             f"  decision               {report.decision}"]
    for m in report.metrics:
        prod = f", stage holder {m['production']:.4g}" if m.get("production") is not None else ""
        base = f"base {m['base']:.4g} -> " if m.get("base") is not None else ""
        lines.append(f"  {m['metric']:<22} {base}tuned {m['tuned']:.4g}{prod}")
    if report.production_version:
        lines.append(f"  stage holder           version {report.production_version} (at registration)")
    d = report.data
    lines += [f"  data files sha256      {d.get('files_sha256', '?')}",
              f"  validated rows sha256  {d.get('validated_sha256', '?')}  ({d.get('rows_accepted', '?')} rows "
              "accepted, "
              f"{d.get('rows_rejected', '?')} rejected)",
              f"  train split sha256     {d.get('train_split_sha256', '?')}",
              f"  base model             {report.base_model.get('name_or_path', '?')}"
              + (f" @ {report.base_model['revision']}" if report.base_model.get("revision") else "")
              + (f" (registered version {report.base_model['registered_version']})"
                 if report.base_model.get("registered_version") else ""),
              f"  merge check            {'passed' if report.merge_check.get('passed') else 'FAILED'}: "
              "max |logit diff| "
              f"{report.merge_check.get('max_abs_logit_diff', float('nan')):.3g} (tolerance "
              f"{report.merge_check.get('tolerance', float('nan')):.3g}, {report.merge_check.get('dtype', '?')})"]
    parity = report.merge_check.get("serving_parity")
    if parity:
        lines.append(f"  serving parity         {'passed' if parity.get('passed') else 'FAILED'}: "
                     f"{parity.get('reason')}")
    if report.chat_template:
        t = report.chat_template
        lines.append(f"  chat template          {t.get('chat_template_source', '?')}, sha256 "
                     f"{str(t.get('chat_template_sha256'))[:12]}"
                     + (f", switches {t['chat_template_kwargs']}" if t.get("chat_template_kwargs") else ""))
    lines += [f"  code                   {report.code.get('commit', '?')}" + (" (uncommitted changes)"
                                                                             if report.code.get("dirty") else ""),
              f"  run                    {report.run.get('name', '?')} ({report.run.get('id', '?')})",
              "  artifacts (version ids):"]
    lines += [f"    {name:<20} {art_id}" for name, art_id in sorted(report.artifacts.items())]
    return lines


def render_html(report: VersionReport) -> str:
    from lorapipe import html_report as h

    promoted = report.stage not in ("none", "")
    metrics = h.table(["metric", "base", "tuned", "stage holder"],
                      [(m["metric"], m.get("base"), m["tuned"], m.get("production")) for m in report.metrics])
    check = report.merge_check
    return h.page(
        f"{report.model} — version {report.version}",
        h.key_values([("stage", report.stage), ("decision", report.decision),
                      ("stage holder at registration", report.production_version or "none")]),
        h.paragraph("promoted" if promoted else "not promoted", "ok" if promoted else "bad"),
        h.section("Metrics: base, tuned and the stage's holder, on this run's test rows", metrics),
        h.section("Merge check", h.key_values([
            ("result", "passed" if check.get("passed") else "FAILED"), ("dtype", check.get("dtype")),
            ("max |logit diff|", check.get("max_abs_logit_diff")), ("tolerance", check.get("tolerance")),
            ("rows checked", check.get("rows_checked")),
            ("serving parity", (("passed: " if check["serving_parity"].get("passed") else "FAILED: ")
                                + str(check["serving_parity"].get("reason"))) if check.get("serving_parity") else
             "not run"),
            ("chat template", ", ".join(f"{k}: {v}" for k, v in sorted(report.chat_template.items())) or
             "not recorded")])),
        h.section("Data", h.key_values(sorted(report.data.items()))),
        h.section("Base model and code", h.key_values([
            ("base model", report.base_model.get("name_or_path")), ("revision", report.base_model.get("revision")),
            ("started from version", report.base_model.get("registered_version")),
            ("commit", report.code.get("commit")), ("uncommitted changes", report.code.get("dirty"))])),
        h.section("Run and artifacts", h.key_values([("run", f"{report.run.get('name')} ({report.run.get('id')})"),
                                                     *sorted(report.artifacts.items())])),
    )
