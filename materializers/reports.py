"""Reports (validation, preflight, plans, metrics, the model version) as JSON, each with a self-contained HTML view
for the dashboard (inline styles, no scripts, no external URL; see lorapipe.html_report)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, Tuple, Type

from pydantic import BaseModel
from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.pydantic_materializer import PydanticMaterializer

from lorapipe import html_report as h
from lorapipe.data.sources import ResolvedData
from lorapipe.data.validation import RejectedRows, ValidationReport
from lorapipe.evaluation.metrics import BaseScores, EvalMetrics
from lorapipe.hardware.plan import PhasePlan, TrainingPlan
from lorapipe.hardware.preflight import PreflightReport, RecommendedConfig
from lorapipe.hardware.probe import HardwareProbe
from lorapipe.registry import StageHolderScores, VersionReport, render_html
from lorapipe.units import format_gib

# problems listed per kind in the validation view, and rejected rows listed; the JSON artifacts keep all of them
PROBLEMS_SHOWN_PER_KIND = 20
REJECTED_ROWS_SHOWN = 500
# Great Expectations' own data docs page, kept beside the report as a file to download (it needs scripts and
# stylesheets from the internet, which the dashboard's frame does not load)
GE_DATA_DOCS = "great_expectations_data_docs.html"


def _figure_png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def token_length_histogram_png(report: ValidationReport) -> bytes:
    """Token lengths of the accepted rows, with the sequence limit where rows get cut."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = report.token_stats
    starts = [b[0] for b in stats.histogram]
    width = (starts[1] - starts[0]) if len(starts) > 1 else 1
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(starts, [b[1] for b in stats.histogram], width=width * 0.9, align="edge", color="#4c72b0")
    ax.axvline(stats.p95, color="#dd8452", linestyle="--", label=f"p95 {stats.p95:.0f}")
    ax.set_xlabel("tokens per row (after the chat template)")
    ax.set_ylabel("rows")
    ax.set_title(f"{stats.rows} rows, p50 {stats.p50:.0f}, max {stats.max}, {stats.truncated_rows} truncated")
    ax.legend()
    fig.tight_layout()
    return _figure_png(fig)


def row_loss_png(metrics: EvalMetrics) -> bytes:
    """Each scored test row's masked loss, base against tuned: points under the diagonal improved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = [(b, t) for b, t in zip(metrics.row_losses["base"], metrics.row_losses["tuned"])
             if b is not None and t is not None]  # rows with no trained token have no loss
    base, tuned = [p[0] for p in pairs], [p[1] for p in pairs]
    fig = Figure(figsize=(5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(base, tuned, s=14, color="#4c72b0")
    if pairs:  # every row truncated before its answer: an empty plot, not a crash
        lo, hi = min(base + tuned), max(base + tuned)
        ax.plot([lo, hi], [lo, hi], "--", color="#999999", label="no change")
        ax.legend()
    better = sum(t < b for b, t in zip(base, tuned))
    ax.set_title(f"per-row loss: {better} of {len(base)} rows lower after tuning")
    ax.set_xlabel("base model loss")
    ax.set_ylabel("tuned model loss")
    fig.tight_layout()
    return _figure_png(fig)


def validation_html(report: ValidationReport) -> str:
    summary = h.key_values([
        ("verdict", report.verdict), ("files", ", ".join(f"{f} ({fmt})" for f, fmt in report.files.items())),
        ("rows read / accepted / rejected", f"{report.rows_read} / {report.rows_accepted} / {report.rows_rejected}"),
        ("errors / warnings", f"{report.errors} / {report.warnings}"), ("data fingerprint", report.data_fingerprint)])
    parts = [h.paragraph("PASSED" if report.passed else "FAILED", "ok" if report.passed else "bad"), summary]
    if report.rows_sampled is not None or len(report.sources) > 1:
        parts.append(h.section(
            "Mixture" + (f": {report.rows_sampled} rows drawn" if report.rows_sampled is not None else ""),
            h.table(["source", "weight / max rows", "read", "accepted", "rejected", "sampled", "share", "sha256"],
                    [(c.name, c.weight if c.weight is not None else f"<= {c.max_rows}" if c.max_rows else "all",
                      c.rows_read, c.rows_accepted, c.rows_rejected, c.rows_sampled, f"{c.share:.1%}",
                      c.sha256[:12]) for c in report.sources])))
    if report.template is not None:
        t = report.template
        parts.append(h.section("Chat template (every render: training, evaluation, predict, serving)", h.key_values([
            ("from", t.source), ("sha256", t.sha256), ("switches", t.kwargs or "none"),
            ("tokens it added (trained)", ", ".join(t.added_tokens) or "none"), ("tokenizer size", t.tokenizer_size)])))
    if report.reasoning is not None:
        r = report.reasoning
        parts.append(h.section("Reasoning traces", h.key_values([
            ("data.reasoning", r.setting), ("rows with a trace", r.rows), ("traces", r.traces),
            *((("trained (inside the labels)", r.trained), ("left out by the template", r.lost))
              if r.setting == "keep" else (("found in the labels anyway", r.leaked),)),
            ("the template reads reasoning_content", r.template_reads_field)])))
    if report.problem_counts:
        severity = {p.code: p.severity for p in report.problems}
        parts.append(h.section("Problems by kind", h.table(
            ["problem", "rows", "severity"],
            sorted(((c, n, severity.get(c, "")) for c, n in report.problem_counts.items()),
                                                    key=lambda r: -r[1]))))
        shown: dict[str, int] = {}
        rows = []
        for p in report.problems:
            shown[p.code] = shown.get(p.code, 0) + 1
            if shown[p.code] <= PROBLEMS_SHOWN_PER_KIND:
                where = f"{os.path.basename(p.source)}:{p.line}" + (f":{p.column}" if p.column else "")
                rows.append((where, p.code, p.field, p.message, p.fix))
        hidden = sum(max(0, n - PROBLEMS_SHOWN_PER_KIND) for n in report.problem_counts.values())
        parts.append(h.section("Problems", h.table(["where", "problem", "field", "what", "fix"], rows,
                                                   keep_columns=(0, 1, 2))))
        if hidden:
            parts.append(h.paragraph(f"and {hidden} more (the first {PROBLEMS_SHOWN_PER_KIND} of each kind are shown; "
                                     "the report artifact's JSON lists every one)", "muted"))
    if report.token_stats:
        t = report.token_stats
        parts.append(h.section("Tokens", h.key_values([
            ("rows", t.rows), ("p50 / p95 / max tokens per row", f"{t.p50:.0f} / {t.p95:.0f} / {t.max}"),
            ("total / trained tokens", f"{t.total_tokens:,} / {t.trainable_tokens:,}"),
            ("rows truncated", t.truncated_rows),
            *((f"padding waste at micro-batch {w.micro_batch_size}",
               f"{w.in_order:.1%} in file order, {w.length_grouped:.1%} grouped by length")
              for w in t.padding_waste)])))
    if report.audit:
        a = report.audit
        parts.append(h.section("Learns-to-stop audit", h.key_values([
            ("result", "passed" if a.passed else "FAILED"),
            ("rows that train the stop token", f"{a.stop_token_trained_fraction:.1%}"),
            ("rows with trained tokens", f"{a.trainable_rows_fraction:.1%}"),
            ("round-trip", f"{a.roundtrip_fraction:.1%}"),
            ("EOS / PAD", f"{a.eos_token!r} / {a.pad_token!r}"), ("chat template from", a.chat_template_source),
            ("explanation", a.explanation)])))
    if report.expectations:
        e = report.expectations
        parts.append(h.section(
            f"Great Expectations suite '{e.suite_name}': {'passed' if e.success else 'FAILED'}",
            h.table(["expectation", "arguments", "observed", "unexpected %", "result"],
                    [(r["expectation"], {k: v for k, v in r["kwargs"].items() if k != "column"}, r["observed"],
                      r.get("unexpected_percent"), h.status(r["success"])) for r in e.results], raw_columns=(4,)),
            h.paragraph(f"Great Expectations' own data docs page is stored beside this report as {GE_DATA_DOCS}.",
                        "muted") if e.data_docs_html else ""))
    return h.page("Validation report", *parts)


def rejected_html(data: RejectedRows) -> str:
    if not data.rows:
        return h.page("Rejected rows", h.paragraph("No row was rejected.", "ok"))
    shown = data.rows[:REJECTED_ROWS_SHOWN]
    more = len(data.rows) - len(shown)
    return h.page(f"Rejected rows: {len(data.rows)}", h.table(
        ["where", "reasons", "the row as given"],
        [(f"{os.path.basename(r.source)}:{r.line}", ", ".join(r.reasons), r.raw[:2000]) for r in shown],
        keep_columns=(0,)),
        h.paragraph(f"and {more} more (the artifact's JSON holds every rejected row)", "muted") if more else "")


def probe_html(probe: HardwareProbe) -> str:
    gpus = [(d.index, d.name, d.total_memory_gib, d.capability, d.bf16) for d in probe.cuda_devices]
    return h.page("Preflight: this machine", h.key_values([
        ("OS / architecture / Python", f"{probe.os} / {probe.machine} / {probe.python}"),
        ("CPU cores", probe.cpu_count),
        ("RAM total / available (GiB)", f"{probe.ram_total_gib} / {probe.ram_available_gib}"),
        (f"free disk at {probe.disk_path} (GiB)", probe.disk_free_gib), ("CUDA", probe.cuda_available),
        ("Apple Silicon / MPS", f"{probe.apple_silicon} / {probe.mps_available}"),
        ("data-parallel processes", probe.world_size)]),
        h.section("CUDA devices", h.table(["index", "name", "memory (GiB)", "capability", "bf16"], gpus)
                  if gpus else h.paragraph("none", "muted")),
        h.section("Packages", h.table(["package", "version"],
                                      sorted((k, v or "not installed") for k, v in probe.packages.items()))))


def preflight_html(report: PreflightReport) -> str:
    mark = {"pass": "✓ pass", "warn": "⚠ warn", "fail": "✗ fail"}
    parts = [h.paragraph(report.summary()),
             h.section("Checks", h.table(["section", "check", "status", "measured", "requirement", "detail"],
                                         [(c.section, c.name, mark[c.status], c.measured, c.requirement, c.detail)
                                          for c in report.checks]))]
    if report.probe_measurements:
        parts.append(h.section("Probe: measured vs predicted peaks (GiB)", h.table(
            ["phase", "predicted", "measured", "error", "device", "seconds"],
            [(r["phase"], r["predicted_gib"], r["peak_gib"], r.get("error"), r["device"], r["seconds"])
             for r in report.probe_measurements])))
    if report.model is not None:
        m = report.model
        parts.append(h.section("Model (from config.json)", h.table(
            ["module kind", "parameters"], [(k, f"{v:,}") for k, v in m.parameter_counts.items()]
            + [("total", f"{m.total_parameters:,}")])))
    return h.page("Preflight report", *parts, probe_html(report.hardware))


def recommended_config_html(rec: RecommendedConfig) -> str:
    import yaml

    return h.page("Recommended config", h.paragraph("Merge this fragment over the config to reproduce the plan."),
                  h.code(yaml.safe_dump(rec.fragment, sort_keys=False)),
                  h.section("Why", h.table(["reason"], [(r,) for r in rec.reasons])))


def training_plan_html(plan: TrainingPlan) -> str:
    m = plan.memory
    return h.page(f"Training plan: {plan.backend} on {plan.device}", h.key_values([
        ("backend", plan.backend), ("device", plan.device), ("dtype", plan.dtype), ("quantization", plan.quantization),
        ("micro-batch x accumulation = effective",
         f"{plan.micro_batch_size} x {plan.gradient_accumulation_steps} = {plan.effective_batch_size}"),
        ("max sequence length", plan.max_seq_length), ("gradient checkpointing", plan.gradient_checkpointing),
        ("optimizer", plan.optimizer), ("data-parallel processes", plan.world_size)]),
        h.section("Memory estimate (GiB)", h.table(
            ["weights", "LoRA + optimizer", "activations and logits", "training peak", "budget"],
            [(m.weights_gib, m.lora_and_optimizer_gib, m.activations_gib, m.total_gib, m.budget_gib)])),
        h.section("Memory terms", h.table(["phase", "term", "MiB", "formula"],
                                          [(t.phase, t.name, f"{t.bytes / 2**20:,.1f}", t.formula) for t in m.terms])),
        h.section("Why", h.table(["reason"], [(r,) for r in plan.reasons])),
        h.section("Warnings", h.table(["warning"], [(w,) for w in plan.warnings]) if plan.warnings
                  else h.paragraph("none", "muted")))


def phase_plan_html(plan: PhasePlan) -> str:
    return h.page(f"{plan.phase.capitalize()} plan", h.key_values([
        ("device", plan.device), ("dtype", plan.dtype), ("batch size", plan.batch_size), ("why", plan.reason),
        ("predicted peak (GiB)", plan.predicted_peak_gib)]),
        h.section("Memory terms", h.table(["term", "MiB", "formula"], [(t.name, f"{t.bytes / 2**20:,.1f}", t.formula)
                                                                       for t in plan.memory_terms])),
        h.section("Warnings", h.table(["warning"], [(w,) for w in plan.warnings]) if plan.warnings
                  else h.paragraph("none", "muted")))


# the evaluation view's metrics table: field, label, which way is better (what "change" means for the reader)
EVAL_METRIC_ROWS = (
    # task: preference (base = the starting SFT model; the reward terms are the tuned model's against it)
    ("preference_accuracy", "preference accuracy (chosen ranked above rejected)", "higher"),
    ("reward_margin", "reward margin (tuned vs starting model, beta x log-ratio)", "higher"),
    ("reward_accuracy", "reward accuracy (positive margin)", "higher"),
    ("chosen_logp_per_token", "chosen answer log-probability per token", "higher"),
    ("rejected_logp_per_token", "rejected answer log-probability per token", "lower"),
    ("rouge_l_rejected", "ROUGE-L against the rejected answer", "lower"),
    ("loss", "loss", "lower"), ("perplexity", "perplexity", "lower"),
    ("exact_match", "exact match (0..1)", "higher"), ("rouge_l", "ROUGE-L F1 (0..1, rouge-score)", "higher"),
    ("bleu", "BLEU (0..100, sacrebleu corpus)", "higher"), ("chrf", "chrF (0..100, sacrebleu corpus)", "higher"),
    ("stop_rate", "learned-to-stop rate", "higher"),
    ("overshoot", "overshoot (mean tokens past the reference)", "lower"),
    ("generation_seconds", "generation time (s)", "lower"))


def classifier_eval_html(metrics: EvalMetrics) -> str:
    """task: classification: the comparison with the baselines, the tuned model's per-class report and confusion
    matrix (table and image), and test rows with every model's prediction."""
    from lorapipe.evaluation.classification import report_html

    c = metrics.classification
    reports = {name: c.report(name) for name in c.reports}
    page = report_html(reports, tuned="tuned")
    if metrics.samples:
        names = [n for n in reports]
        samples = h.table(["row", "text", "label", *names],
                          [(f"{s['source'].rsplit('/', 1)[-1]}:{s['line']}",
                            s["text"] + (f" || {s['text_pair']}" if s.get("text_pair") else ""), s["label"],
                            *[s.get(n, "") for n in names]) for s in metrics.samples], keep_columns=(0,))
        page = page.replace("</body>", h.section(f"First {len(metrics.samples)} test rows", samples) + "</body>")
    return page


def eval_html(metrics: EvalMetrics) -> str:
    if metrics.classification is not None:
        return classifier_eval_html(metrics)
    rows = []
    for name, label, better in EVAL_METRIC_ROWS:
        base, tuned = getattr(metrics.base, name), getattr(metrics.tuned, name)
        if tuned is None:  # not measured (no generation, or a metric left out of evaluate.generation_metrics)
            continue
        change = f"{(tuned - base) / base:+.1%}" if base else "—"
        rows.append((label, base, tuned, change, better))
    parts = [h.paragraph(f"{'Tuned beats base' if metrics.tuned_beats_base else 'Tuned does not beat base'} on "
                         f"perplexity ({metrics.perplexity_gain:+.1%}); {metrics.scored_rows} of "
                         f"{metrics.test_rows} test rows scored ({metrics.scored_tokens:,} tokens), "
                         f"{metrics.generated_rows} generated; "
                         f"memory {format_gib(metrics.memory_gib)}", "ok" if metrics.tuned_beats_base else "bad"),
             h.table(["metric", "base", "tuned", "change", "better"], rows)]
    g = metrics.generation
    if g:
        parts.append(h.paragraph(
            f"Generation: {'greedy' if g.get('greedy', True) else 'sampled'}, seed {g.get('seed')}, batches of "
            f"{g.get('batch_size')} ({g.get('padding', 'left')}-padded), at most {g.get('max_new_tokens')} new tokens, "
            f"stopping on {', '.join(g.get('end_tokens') or []) or 'EOS'}. Overshoot: tokens generated beyond the "
            "reference answer's length (0 when not longer), averaged over the generated rows.", "muted"))
    if metrics.row_losses.get("base") and metrics.row_losses.get("tuned"):
        parts.append(h.section("Per-row loss", h.image(row_loss_png(metrics), "per-row loss, base vs tuned")))
    if metrics.samples:
        def stopped(s: dict, who: str) -> bool:
            return bool(s.get(f"{who}_stopped", s.get("stopped") if who == "tuned" else False))  # older: "stopped"

        def shown(s: dict, who: str) -> str:
            text = s.get(who, s.get("prediction", "") if who == "tuned" else "")  # older samples: "prediction"
            return text + ("" if stopped(s, who) else "  [did not stop]")

        parts.append(h.section("Generations side by side", h.table(
            ["row", "prompt", "reference", "base", "tuned", "stopped (base / tuned)"],
            [(s.get("source", "").rsplit("/", 1)[-1], s.get("prompt", ""), s.get("reference", ""), shown(s, "base"),
              shown(s, "tuned"), f"{h.fmt(stopped(s, 'base'))} / {h.fmt(stopped(s, 'tuned'))}")
             for s in metrics.samples], keep_columns=(0, 5))))
    return h.page("Evaluation: base vs tuned", *parts)


def base_scores_html(data: BaseScores) -> str:
    scores = [(k, v) for k, v in data.scores.model_dump().items() if v is not None]
    return h.page("The untuned base, scored once", h.paragraph(
        f"{data.model}{'@' + data.revision if data.revision else ''} on {len(data.row_losses)} test rows "
        f"({data.scored_tokens:,} tokens), {len(data.generations)} generated; memory {format_gib(data.memory_gib)}. "
        "Cached on the base, the test rows and the evaluation settings: every adapter trained on this base is "
        "compared with these scores."), h.table(["metric", "value"], scores))


def resolved_data_html(data: ResolvedData) -> str:
    return h.page("Data source", h.key_values([("source", data.source), ("sha256 of the bytes", data.sha256),
                                               ("files", len(data.files))]),
                  h.section("Files read, in order", h.table(["file"], [(f,) for f in data.files])))


def stage_holder_html(data: StageHolderScores) -> str:
    parts = [h.key_values([("stage", data.stage), ("holder", data.version or "none"), ("note", data.note)])]
    if data.scores:
        parts.append(h.section("The holder scored on this run's test rows",
                               h.table(["metric", "value"], sorted((k, v) for k, v in data.scores.items()))))
    return h.page("Stage holder", *parts)


VIEWS = {BaseScores: base_scores_html, ResolvedData: resolved_data_html,
         StageHolderScores: stage_holder_html, ValidationReport: validation_html,
         RejectedRows: rejected_html,
         HardwareProbe: probe_html, PreflightReport: preflight_html, RecommendedConfig: recommended_config_html,
         TrainingPlan: training_plan_html, PhasePlan: phase_plan_html, EvalMetrics: eval_html,
         VersionReport: render_html}


class ReportMaterializer(PydanticMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = tuple(VIEWS)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def _write(self, name: str, content: str | bytes) -> str:
        path = os.path.join(self.uri, name)
        with fileio.open(path, "wb" if isinstance(content, bytes) else "w") as fh:
            fh.write(content)
        return path

    def save_visualizations(self, data: BaseModel) -> Dict[str, VisualizationType]:
        out = {self._write("report.html", VIEWS[type(data)](data)): VisualizationType.HTML}
        if isinstance(data, ValidationReport):
            if data.token_stats and data.token_stats.histogram:
                out[self._write("token_lengths.png", token_length_histogram_png(data))] = VisualizationType.IMAGE
            if data.expectations and data.expectations.data_docs_html:
                self._write(GE_DATA_DOCS, data.expectations.data_docs_html)  # a file to download, not a view
        if isinstance(data, EvalMetrics) and data.classification is not None:
            import tempfile

            from lorapipe.evaluation.classification import confusion_matrix_png

            with tempfile.TemporaryDirectory() as tmp:
                png = confusion_matrix_png(data.classification.report("tuned"), os.path.join(tmp, "cm.png"),
                                           title="tuned: confusion matrix (test split)")
                out[self._write("confusion_matrix.png", png.read_bytes())] = VisualizationType.IMAGE
        return out

    def extract_metadata(self, data: BaseModel) -> Dict[str, Any]:
        if isinstance(data, ValidationReport):
            meta = {"passed": data.passed, "rows_accepted": data.rows_accepted, "rows_rejected": data.rows_rejected,
                    "data_fingerprint": data.data_fingerprint}
            if data.rows_sampled is not None:
                meta["rows_sampled"] = data.rows_sampled
                meta["source_shares"] = {c.name: c.share for c in data.sources}
            return meta
        if isinstance(data, EvalMetrics) and data.classification is not None:
            return {"tuned_macro_f1": data.tuned.macro_f1, "tuned_accuracy": data.tuned.accuracy,
                    "untuned_macro_f1": data.base.macro_f1, "tuned_beats_base": data.tuned_beats_base}
        if isinstance(data, EvalMetrics):
            return {"base_perplexity": data.base.perplexity, "tuned_perplexity": data.tuned.perplexity,
                    "tuned_beats_base": data.tuned_beats_base}
        if isinstance(data, TrainingPlan):
            return {"backend": data.backend, "device": data.device, "dtype": data.dtype,
                    "micro_batch_size": data.micro_batch_size,
                    "gradient_accumulation_steps": data.gradient_accumulation_steps}
        if isinstance(data, PhasePlan):
            return {"phase": data.phase, "device": data.device, "dtype": data.dtype, "batch_size": data.batch_size}
        if isinstance(data, VersionReport):
            return {"stage": data.stage, "decision": data.decision}
        return {}
