"""Lineage both ways, read from the ZenML store.

Down: a model version -> merged model -> adapter -> training run and plan -> splits -> validated dataset -> the
data source and its sha256, with the validation and preflight reports, artifact versions, run ids and dates.
Up: a dataset (its sha256 or a file) -> every model version trained on it, with its stage.
"""

from __future__ import annotations

from typing import Any, Optional

from lorapipe_app.api import UserMistake

STAGES = ("production", "staging", "latest", "archived")


def parse_model_ref(ref: str, version: Optional[str] = None) -> tuple[str, Optional[str]]:
    """`MODEL`, `MODEL:VERSION` or `MODEL:STAGE` (production, staging, latest)."""
    name, _, tail = ref.partition(":")
    if tail and version and tail != version:
        raise UserMistake(f"{ref}: the version is given twice ({tail} and --version {version}); give one")
    return name, tail or version


def find_model_version(ref: str, version: Optional[str] = None) -> Any:
    from zenml.client import Client
    from zenml.enums import ModelStages

    name, wanted = parse_model_ref(ref, version)
    client = Client()
    try:
        client.get_model(name)
    except KeyError:
        known = [m.name for m in client.list_models(size=20).items]
        raise UserMistake(f"no model named {name} in this ZenML store"
                          + (f"; models here: {', '.join(known)}" if known else "; run `lorapipe run -c CONFIG` first")
                          ) from None
    if wanted in (None, "latest"):
        page = client.list_model_versions(model=name, sort_by="desc:created", size=1)
        if not page.items:
            raise UserMistake(f"model {name} has no version yet")
        wanted = page.items[0].name
    if wanted in STAGES:
        wanted = ModelStages(wanted)
    try:
        return client.get_model_version(name, wanted)
    except KeyError:
        what = f"stage {wanted.value}" if isinstance(wanted, ModelStages) else f"version {wanted}"
        raise UserMistake(f"model {name} has no {what}; it has {existing_versions(name)}") from None


def existing_versions(name: str, shown: int = 8) -> str:
    """'versions a (production), b, c and 4 more': what a mistyped version or stage could have meant."""
    from zenml.client import Client

    page = Client().list_model_versions(model=name, sort_by="desc:created", size=shown)
    names = [f"{mv.name} ({stage_name(mv)})" if mv.stage else mv.name for mv in page.items]
    more = f" and {page.total - len(names)} more" if page.total > len(names) else ""
    return ("versions " + ", ".join(names) + more) if names else "no version yet"


def stage_name(mv: Any) -> str:
    """A model version's stage as text, "none" when it has none."""
    stage = mv.stage
    return str(getattr(stage, "value", stage)) if stage else "none"


def _artifact(av: Any, **extra: Any) -> dict[str, Any]:
    return {"name": av.artifact.name, "version": str(av.version), "id": str(av.id), "uri": av.uri,
            "created": av.created.isoformat(timespec="seconds"),
            "produced_by_run": str(av.producer_pipeline_run_id) if av.producer_pipeline_run_id else None, **extra}


def lineage_tree(mv: Any) -> dict[str, Any]:
    """The model version's lineage as nested dicts (what `lineage --json` prints)."""
    from zenml.client import Client

    client = Client()
    meta = dict(mv.run_metadata)
    report = meta.get("report") or {}
    run_id = (report.get("run") or {}).get("id")
    if run_id:
        run = client.get_pipeline_run(run_id)
    else:  # a version registered without lorapipe's report: the run linked to it (not the deprecated pipeline_runs)
        links = client.list_model_version_pipeline_run_links(model_version_id=mv.id, size=1).items
        run = links[0].pipeline_run if links else None
    if run is None:
        raise UserMistake(f"model {mv.model.name} version {mv.name} has no pipeline run in this store")
    steps = run.steps

    def output(step: str, name: str) -> Any:
        outs = steps[step].outputs.get(name) if step in steps else None
        return outs[0] if outs else None

    def loaded(step: str, name: str) -> Any:
        av = output(step, name)
        return av.load() if av is not None else None

    producer_names: dict[str, str] = {}

    def producer(av: Any) -> dict[str, Any]:
        rid = av.producer_pipeline_run_id
        if rid is None:
            return {}
        if str(rid) not in producer_names:
            producer_names[str(rid)] = client.get_pipeline_run(rid).name
        return {"run_id": str(rid), "run_name": producer_names[str(rid)], "served_from_cache": rid != run.id}

    data = meta.get("data") or {}
    resolved = loaded("resolve_data_source", "resolved_data")
    validation = loaded("validate_data", "validation_report")
    plan = loaded("preflight", "training_plan")
    checked = loaded("preflight", "preflight_report")
    probe = getattr(checked, "hardware", checked)  # a PreflightReport (or, from older runs, the HardwareProbe itself)
    adapter_av, merged_av = output("train_adapter", "adapter"), output("merge_model", "merged_model")
    adapter_meta = (adapter_av.run_metadata if adapter_av is not None else {}) or {}
    training = meta.get("training") or {}

    source = {"source": resolved.source if resolved else data.get("source"),
              "files": resolved.files if resolved else data.get("files"),
              "sha256": data.get("files_sha256") or (resolved.sha256 if resolved else None),
              "sources": data.get("sources") if len(data.get("sources") or []) > 1 or data.get("rows_sampled")
              else None}
    validated_av = output("validate_data", "validated_dataset")
    validated = {**(_artifact(validated_av) if validated_av else {}), "sha256": data.get("validated_sha256"),
                 "rows": data.get("rows_accepted"), "rows_rejected": data.get("rows_rejected"),
                 "validation_report": {"passed": validation.passed, "rows_accepted": validation.rows_accepted,
                                       "rows_rejected": validation.rows_rejected,
                                       "warnings": validation.warnings} if validation else None,
                 "data": source}
    splits = {}
    for name in ("train_split", "eval_split", "test_split"):
        av = output("split_data", name)
        if av is not None:
            splits[name] = _artifact(av, rows=av.run_metadata.get("rows"), sha256=av.run_metadata.get("fingerprint"))
    adapter = {**(_artifact(adapter_av, training_run=producer(adapter_av)) if adapter_av else {}),
               "steps": training.get("steps"), "train_loss": training.get("train_loss"),
               "tokens_per_second": training.get("tokens_per_second"),
               "plan": {"backend": plan.backend, "device": plan.device, "dtype": plan.dtype,
                        "quantization": plan.quantization, "micro_batch_size": plan.micro_batch_size,
                        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
                        "world_size": plan.world_size} if plan else meta.get("plan"),
               "preflight_report": {"cpu_count": probe.cpu_count, "ram_total_gib": probe.ram_total_gib,
                                    "accelerator": probe.accelerator,
                                    "cuda": [d.name for d in probe.cuda_devices]} if probe else meta.get("machine"),
               "base_model": meta.get("base_model"), "seed": meta.get("seed"),
               "splits": splits, "validated_dataset": validated}
    adapter.update({k: v for k, v in adapter_meta.items() if k in ("trainable_parameters",)})
    merged = {**(_artifact(merged_av, produced=producer(merged_av)) if merged_av else {}),
              "merge_check": meta.get("merge_check"), "adapter": adapter}
    return {"model": mv.model.name, "version": mv.name, "stage": stage_name(mv),
            "registered": mv.created.isoformat(timespec="seconds"),
            "decision": report.get("decision", meta.get("stage_decision")), "metrics": meta.get("metrics"),
            "config_sha256": meta.get("config_sha256"), "code": meta.get("code"),
            "run": {"id": str(run.id), "name": run.name, "status": str(run.status).rsplit(".", 1)[-1],
                    "created": run.created.isoformat(timespec="seconds")},
            "merged_model": merged}


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "?" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def render_tree(tree: dict[str, Any]) -> list[str]:
    """The tree as indented lines: each level is what the one above was made from."""
    m, merged = tree.get("metrics") or {}, tree["merged_model"]
    adapter = merged["adapter"]
    validated = adapter["validated_dataset"]
    lines = [f"model {tree['model']} version {tree['version']}  stage {tree['stage']}  registered "
             f"{tree['registered']}",
             f"  decision: {tree.get('decision') or '?'}",
             (f"  macro F1 majority {_fmt(m.get('majority_macro_f1'), '.3f')}, untuned "
              f"{_fmt(m.get('base_macro_f1'), '.3f')} -> tuned {_fmt(m.get('tuned_macro_f1'), '.3f')}; accuracy "
              f"{_fmt(m.get('base_accuracy'), '.3f')} -> {_fmt(m.get('tuned_accuracy'), '.3f')}"
              if m.get("tuned_macro_f1") is not None else  # a classifier: its report, not a perplexity
              f"  perplexity base {_fmt(m.get('base_perplexity'))} -> tuned {_fmt(m.get('tuned_perplexity'))}"
              + (f"; ROUGE-L {_fmt(m.get('base_rouge_l'), '.3f')} -> {_fmt(m.get('tuned_rouge_l'), '.3f')}"
                 if m.get("tuned_rouge_l") is not None else "")),
             f"  run {tree['run']['name']} ({tree['run']['id']}) {tree['run']['status']} {tree['run']['created']}",
             f"  code {(tree.get('code') or {}).get('commit', '?')}, config sha256 {tree.get('config_sha256') or '?'}"]
    check = merged.get("merge_check") or {}
    lines += [f"└─ merged model  v{merged.get('version', '?')}  {merged.get('uri', '?')}",
              f"   merge check {'passed' if check.get('passed') else 'FAILED'}: max |logit diff| "
              f"{_fmt(check.get('max_abs_logit_diff'), '.3g')} <= {_fmt(check.get('tolerance'), '.3g')} "
              f"({check.get('dtype', '?')})"]
    trained = adapter.get("training_run") or {}
    plan = adapter.get("plan") or {}
    base = adapter.get("base_model") or {}
    lines += [f"   └─ adapter  v{adapter.get('version', '?')}  {adapter.get('uri', '?')}",
              f"      trained by run {trained.get('run_name', '?')} ({trained.get('run_id', '?')}) "
              f"{adapter.get('created', '')}" + ("  [this run used it from the cache]"
                                                  if trained.get("served_from_cache") else ""),
              f"      base {base.get('name_or_path', '?')}" + (f" @ {base['revision']}" if base.get("revision") else "")
              + (f" (registered version {base['registered_version']})" if base.get("registered_version") else "")
              + f"; {adapter.get('steps', '?')} steps, loss {_fmt(adapter.get('train_loss'))}, "
              f"{_fmt(adapter.get('tokens_per_second'), '.0f')} tok/s, seed {adapter.get('seed', '?')}",
              f"      ├─ plan  {plan.get('backend', '?')} on {plan.get('device', '?')} in {plan.get('dtype', '?')}"
              f"{'' if plan.get('quantization') in (None, 'none') else ' ' + plan['quantization']}, micro batch "
              f"{plan.get('micro_batch_size', '?')} x {plan.get('gradient_accumulation_steps', '?')} accumulation "
              f"x {plan.get('world_size', 1)} process(es)"]
    machine = adapter.get("preflight_report") or {}
    lines.append(f"      ├─ preflight  {machine.get('accelerator', '?')}, {machine.get('cpu_count', '?')} CPUs, "
                 f"{_fmt(machine.get('ram_total_gib', machine.get('ram_total_gb')), '.0f')} GiB RAM"
                 + (f", GPUs {', '.join(machine['cuda'])}" if machine.get("cuda") else ""))
    for name, split in adapter.get("splits", {}).items():
        lines.append(f"      ├─ {name:<11} v{split['version']}  {_fmt(split.get('rows'))} rows  sha256 "
                     f"{split.get('sha256') or '?'}")
    report = validated.get("validation_report") or {}
    data = validated.get("data") or {}
    lines += [f"      └─ validated dataset  v{validated.get('version', '?')}  {_fmt(validated.get('rows'))} rows  "
              f"sha256 {validated.get('sha256') or '?'}",
              f"         validation {'passed' if report.get('passed') else 'FAILED'}: "
              f"{_fmt(report.get('rows_accepted'))} accepted, {_fmt(report.get('rows_rejected'))} rejected"
              + (f", {report['warnings']} warning(s)" if report.get("warnings") else ""),
              f"         └─ data  {data.get('source') or '?'}  sha256 {data.get('sha256') or '?'}"]
    for src in data.get("sources") or []:  # a mixture: each source, its rows drawn and share
        lines.append(f"            source {src['name']}: {src.get('rows_sampled')} of {src.get('rows_accepted')} "
                     f"accepted rows ({src.get('share', 0):.1%}), sha256 {src.get('sha256') or '?'}")
    lines += [f"            {f}" for f in (data.get("files") or [])[:20]]
    if len(data.get("files") or []) > 20:
        lines.append(f"            ... and {len(data['files']) - 20} more files (--json lists all)")
    return lines


def versions_trained_on(dataset: str) -> tuple[set[str], list[dict[str, Any]]]:
    """(the sha256 looked for, every model version whose data files, validated rows or train split match)."""
    from pathlib import Path

    from zenml.client import Client
    from zenml.utils.pagination_utils import depaginate_stream

    from lorapipe.data.formats import file_fingerprint

    wanted = {file_fingerprint([dataset])} if Path(dataset).is_file() else {dataset.lower()}
    client = Client()
    found = []
    for model in depaginate_stream(client.list_models, size=100):
        for mv in depaginate_stream(client.list_model_versions, model=model.id, hydrate=True, size=100):
            data = mv.run_metadata.get("data") or {}
            keys = {name: data.get(key) for name, key in (("data files", "files_sha256"),
                                                          ("validated rows", "validated_sha256"),
                                                          ("train split", "train_split_sha256"))}
            matched = [name for name, value in keys.items() if value and value.lower() in wanted]
            # one file of several, or one source of a mixture (its share said)
            matched += [f"file {Path(f).name}" for f, sha in (data.get("file_sha256") or {}).items()
                        if sha.lower() in wanted and "data files" not in matched]
            matched += [f"source {src['name']} ({src.get('share', 0):.0%} of the rows)"
                        for src in data.get("sources") or [] if len(data.get("sources") or []) > 1
                        and (src.get("sha256") or "").lower() in wanted]
            if matched:
                found.append({"model": model.name, "version": mv.name, "stage": stage_name(mv), "matched": matched,
                              "registered": mv.created.isoformat(timespec="seconds")})
    return wanted, sorted(found, key=lambda r: r["registered"])
