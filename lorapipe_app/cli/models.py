"""`lorapipe predict` and `lorapipe build-tiny-model`: answer with a fine-tuned model, build the test model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from lorapipe.models.tiny import SIZES as TINY_SIZES
from lorapipe_app.cli.common import REPO_ROOT, fail, json_stdout, opens_store


def _model_folder(ref: str, adapter: bool) -> str:
    """A local folder as given, or a registered version's merged model (its adapter with --adapter)."""
    if Path(ref).is_dir():
        return ref
    from lorapipe_app.lineage import find_model_version

    return _version_folder(find_model_version(ref), ref, adapter)


def _version_folder(mv: Any, ref: str, adapter: bool) -> str:
    """A registered version's merged model folder (its adapter with `adapter`)."""
    name = "adapter" if adapter else "merged_model"
    versions = mv.model_artifacts.get(name) or mv.data_artifacts.get(name)
    if not versions:
        fail(f"{ref}: version {mv.name} holds no {name.replace('_', ' ')}"
             + ("" if adapter else "; --adapter loads its base and adapter instead"))
    latest = versions[max(versions, key=lambda v: int(v) if str(v).isdigit() else 0)]
    return latest.load().path


@click.command()
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("-p", "--prompt", "prompts", multiple=True, help="A user message (repeatable).")
@click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False),
              help="JSONL of prompts: {\"prompt\": ...} or {\"messages\": [...]} per line (or plain lines).")
@click.option("--system", help="A system message before each prompt.")
@click.option("--adapter", "use_adapter", is_flag=True,
              help="Load the version's base model and adapter instead of its merged model.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--stream", is_flag=True, help="Print each answer as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per answer (prompt, completion, stopped).")
@click.option("--pair", "text_pair", help="A classifier of text pairs: the second text of each pair.")
@click.option("--text-key", default="text", show_default=True, help="A classifier's --file: the text field.")
@click.option("--text-pair-key", default="text_pair", show_default=True,
              help="A classifier's --file: the second text's field.")
@opens_store
def predict(model: str, prompt: Optional[str], prompts: tuple, prompt_file: Optional[str], system: Optional[str],
            use_adapter: bool, max_new_tokens: int, stream: bool, as_json: bool, text_pair: Optional[str],
            text_key: str = "text", text_pair_key: str = "text_pair") -> int:
    """Answer prompts with a fine-tuned model: MODEL[:VERSION|STAGE] from the registry, or a model/adapter folder.

    Greedy decoding with the model's saved chat template, stopping on every end token (EOS and the template's
    turn end); says when an answer hit --max-new-tokens without stopping. No prompt given: stdin lines.
    A classifier (task: classification) prints each text's label and every label's probability instead; --file
    then reads rows with a "text" (and "text_pair") field, JSONL or CSV.

    \b
    Examples:
      lorapipe predict lorapipe-quickstart:staging "What is new in SwiftUI?"
      lorapipe predict lorapipe-quickstart:production --file prompts.jsonl --json > answers.jsonl
      lorapipe predict lorapipe-quickstart --adapter --stream -p "Hello"
      lorapipe predict runs/<key>/adapter --max-new-tokens 64 < prompts.txt
      lorapipe predict lorapipe-router:staging "How many points did the Eagles score?"
    """
    from lorapipe.phases.predict import generate, is_classifier, read_prompts

    asked: list = ([prompt] if prompt else []) + list(prompts)
    folder = _model_folder(model, use_adapter)
    if is_classifier(folder):
        return _classify(folder, asked, prompt_file, text_pair, as_json, text_key, text_pair_key)
    if prompt_file:
        try:
            asked += read_prompts(prompt_file)
        except ValueError as exc:
            fail(str(exc))
    if not asked:
        asked = [line.strip() for line in sys.stdin if line.strip()]
    if not asked:
        raise click.UsageError("give a PROMPT, --prompt TEXT (repeatable), --file prompts.jsonl, or lines on stdin")
    loaded, tokenizer = _load_for_predict(folder, as_json)
    for question in asked:
        if stream and not as_json:
            shown = question if isinstance(question, str) else question[-1].get("content", "")
            click.echo(f"> {shown}")
        answer = generate(loaded, tokenizer, question, max_new_tokens, system,
                          stream=sys.stdout if stream and not as_json else None)
        if as_json:
            click.echo(json.dumps(answer, ensure_ascii=False), file=json_stdout())
            continue
        if not stream:
            click.echo(f"> {answer['prompt']}\n{answer['completion']}")
        click.echo(("" if answer["stopped"] else f"[did not stop within {max_new_tokens} new tokens]\n"))
    return 0


def _load_for_predict(folder: str, as_json: bool) -> tuple[Any, Any]:
    """The model and tokenizer `predict` answers with, on this machine's inference device; said on stderr."""
    from lorapipe.phases.predict import inference_device, load_for_inference

    device, dtype = inference_device()
    try:
        loaded, tokenizer, described = load_for_inference(folder, device, dtype)
    except FileNotFoundError as exc:
        fail(str(exc))
    if not as_json:
        click.echo(f"{described} on {device} in {dtype}", err=True)
    return loaded, tokenizer


def _classify(folder: str, texts: list, rows_file: Optional[str], text_pair: Optional[str], as_json: bool,
              text_key: str = "text", text_pair_key: str = "text_pair") -> int:
    """`predict` with a classifier: each text's label and the probability of every label."""
    from lorapipe.phases.predict import classifier_settings, classify, read_rows

    rows = [(t, text_pair) for t in texts]
    if rows_file:
        try:
            rows += read_rows(rows_file, text_key, text_pair_key)
        except ValueError as exc:
            fail(str(exc))
    if not rows:
        rows = [(line.strip(), text_pair) for line in sys.stdin if line.strip()]
    if not rows:
        raise click.UsageError("give a TEXT, --prompt TEXT (repeatable), --file rows.jsonl, or lines on stdin")
    settings = classifier_settings(folder)
    if settings["text_pair"] and any(pair is None for _, pair in rows):
        raise click.UsageError("this classifier was trained on text pairs: give --pair TEXT, or a --file whose rows "
                               f"have '{text_pair_key}'")
    loaded, tokenizer = _load_for_predict(folder, as_json)
    for text, pair in rows:
        answer = classify(loaded, tokenizer, text, pair, settings["max_length"])
        if as_json:
            click.echo(json.dumps(answer, ensure_ascii=False), file=json_stdout())
            continue
        ranked = sorted(answer["probabilities"].items(), key=lambda kv: -kv[1])
        click.echo(f"> {text}" + (f" || {pair}" if pair else ""))
        click.echo(f"{answer['label']}  ({', '.join(f'{name} {p:.3f}' for name, p in ranked)})")
    return 0



@click.command("build-tiny-model")
@click.option("--out", default="models/tiny-llama", show_default=True, type=click.Path(file_okay=False))
@click.option("--corpus", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL files to train the tokenizer on (default: the quickstart data).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.Choice(list(TINY_SIZES)), default="tiny", show_default=True,
              help="Model shape: tiny (0.2 M parameters: quickstart, tests), 25m (~25 M: benchmarks) or 56m-v32k "
                   "(~56 M, 32k vocabulary: memory benchmarks).")
@click.option("--encoder", is_flag=True,
              help="A tiny random BERT-style encoder with a WordPiece tokenizer instead (task: classification); its "
                   "tokenizer is trained on the texts of --corpus (default: the classification example's data).")
def build_tiny_model(out: str, corpus: tuple, seed: int, size: str, encoder: bool) -> int:
    """Build the deterministic tiny Llama the quickstart and tests train (no download).

    \b
    Examples:
      lorapipe build-tiny-model --out models/tiny-llama
      lorapipe build-tiny-model --size 25m --out models/llama-25m   # a model where arithmetic matters
      lorapipe build-tiny-model --encoder --out models/tiny-encoder  # for configs/classification-quickstart.yaml
    """
    from lorapipe.models.tiny import build_tiny_encoder
    from lorapipe.models.tiny import build_tiny_model as build

    if encoder:
        from lorapipe.data.formats import read_records

        files = [str(p) for p in corpus] or [str(REPO_ROOT / "data" / "classification" / "source_routing.jsonl")]
        records = read_records(files).records
        texts = [r.text for r in records if r.text] + [m["content"] for r in records for m in r.messages
                                                       if m.get("content")]
        click.echo(f"tiny encoder written to {build_tiny_encoder(out, texts, seed=seed)}")
        return 0
    texts = [Path(p) for p in corpus] or [REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"]
    click.echo(f"{size} model written to {build(out, texts, seed=seed, size=size)}")
    return 0




def _served(ref: str) -> tuple[str, str]:
    """(the merged model's folder, the name clients ask for): a registered version as `MODEL:VERSION`, a folder by
    its name."""
    if Path(ref).is_dir():
        return ref, Path(ref).resolve().name
    from lorapipe_app.lineage import find_model_version

    mv = find_model_version(ref)
    return _version_folder(mv, ref, False), f"{mv.model.name}:{mv.name}"


def _parity_problem(folder: str) -> Optional[str]:
    """Why the folder's serving-parity check does not vouch for it, or None when it passed."""
    record = Path(folder) / "lorapipe_merge.json"
    if not record.is_file():
        return "it was not merged by lorapipe, so no serving-parity check was run"
    parity = (json.loads(record.read_text()).get("check") or {}).get("serving_parity")
    if not parity:
        return "its merge ran no serving-parity check (merge.parity_samples: 0, or a version from before the check)"
    return None if parity.get("passed") else f"its serving-parity check failed: {parity.get('reason')}"


@click.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="The port (0: a free one, said at start).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens an answer may have when a request gives no max_tokens.")
@click.option("--allow-unchecked", is_flag=True,
              help="Serve a model whose serving-parity check did not pass (or never ran).")
@opens_store
def serve(model: str, host: str, port: int, max_new_tokens: int, allow_unchecked: bool) -> int:
    """Serve a registered version (MODEL, MODEL:VERSION or MODEL:STAGE) or a merged model folder over an
    OpenAI-compatible HTTP API on this machine (transformers): GET /v1/models, POST /v1/chat/completions (streaming
    too). Prompts use the version's own chat template and stop tokens; a version whose serving-parity check did not
    pass is refused unless --allow-unchecked. Stops on Ctrl-C or SIGTERM.

    \b
    Examples:
      lorapipe serve lorapipe-quickstart:staging
      lorapipe serve lorapipe-quickstart:3 --port 8080
      curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
    """
    import signal
    import threading

    from lorapipe.phases.predict import is_classifier
    from lorapipe.serving.openai_server import ChatModel, make_server

    folder, name = _served(model)
    if is_classifier(folder):
        fail(f"{model}: a classifier; `lorapipe serve` serves chat models (use `lorapipe predict` to classify)")
    problem = _parity_problem(folder)
    if problem and not allow_unchecked:
        fail(f"{model}: not served: {problem}; --allow-unchecked serves it anyway")
    loaded, tokenizer = _load_for_predict(folder, as_json=False)
    try:
        server = make_server(ChatModel(loaded, tokenizer, name), host, port, max_new_tokens)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port (0: a free one)")
    bound_host, bound_port = server.server_address[:2]

    def stop(signum: int, _frame: object) -> None:  # shutdown() waits for serve_forever: from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    if problem:
        click.echo(f"warning: serving unchecked: {problem}", err=True)
    click.echo(f"serving {name} at http://{bound_host}:{bound_port}/v1 (model name {name!r}; POST "
               "/v1/chat/completions, GET /v1/models); Ctrl-C or SIGTERM stops it", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    click.echo("stopped", err=True)
    return 0


@click.command()
@click.argument("stage", required=False)
@click.option("--model", "model_name", default="lorapipe-quickstart", show_default=True,
              help="The registered model (register.model_name) whose stage holder answers.")
@click.option("--name", "deployment_name", help="The deployment's name (default: MODEL-STAGE).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--run-config", type=click.Path(exists=True, dir_okay=False),
              help="A ZenML run configuration with the deployer's settings, e.g. "
                   "configs/stacks/kubernetes-deployer.deploy.yaml.")
@click.option("--delete", "delete", metavar="NAME", help="Stop and remove the deployment NAME instead.")
@opens_store
def deploy(stage: Optional[str], model_name: str, deployment_name: Optional[str], max_new_tokens: int,
           run_config: Optional[str], delete: Optional[str]) -> int:
    """Deploy an inference pipeline (prompt -> answer) with the active stack's deployer (the local one here, a
    Kubernetes one on a cluster): the version holding STAGE answers each request, so a new holder is served on its
    first request, at the same URL. Deploying again under the same name updates it. `zenml deployment list` shows it.

    \b
    Examples:
      lorapipe deploy staging --model lorapipe-quickstart
      curl -X POST http://127.0.0.1:8000/invoke -H 'Content-Type: application/json' \\
           -d '{"parameters": {"prompt": "What is new in SwiftUI?"}}'
      lorapipe deploy --delete lorapipe-quickstart-staging
    """
    from lorapipe_app.api import UserMistake, delete_deployment, deploy_stage

    try:
        if delete:
            delete_deployment(delete)
            click.echo(f"deleted deployment {delete}")
            return 0
        if not stage:
            raise click.UsageError("give a STAGE (staging, production), or --delete NAME")
        deployment = deploy_stage(stage, model_name, deployment_name, max_new_tokens, run_config)
    except UserMistake as exc:
        fail(str(exc))
    click.echo(f"deployed {deployment.name}: the {model_name} {stage} holder answers at {deployment.url}/invoke "
               f"(POST {{\"parameters\": {{\"prompt\": ...}}}}); status {deployment.status}")
    return 0
