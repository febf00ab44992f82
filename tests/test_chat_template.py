"""A chat template chosen on purpose: `model.chat_template` names a built-in (ChatML, Llama-3, Alpaca), a Jinja file or
a Jinja string. A built-in's special tokens missing from the vocabulary are added, the base's embeddings grow to the
tokenizer (each new row starting at the mean of the others), the new rows train (PEFT's trainable tokens), the
template is saved with the adapter and the merged model, and the merged model as served answers as base+adapter."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorapipe.config import ModelSection, TrainSection
from lorapipe.hardware.plan import PhasePlan

pytestmark = pytest.mark.slow  # trains the tiny model once and merges it


@pytest.fixture(scope="module")
def llama3_run(tiny_model_dir, quickstart_records, tmp_path_factory):
    """The tiny base (whose tokenizer has no Llama-3 header tokens) trained with model.chat_template: llama3."""
    from lorapipe.data.split import split_records
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe
    from lorapipe.phases.train_in_process import train_in_process

    work = tmp_path_factory.mktemp("llama3")
    train, evals, test = split_records(quickstart_records[:120], 0.0, 0.1)
    model = ModelSection(name_or_path=str(tiny_model_dir), chat_template="llama3")
    cfg = TrainSection(backend="hf", device="cpu", max_seq_length=128, epochs=1, learning_rate=1e-2,
                       effective_batch_size=8, save_steps=1000, output_root=str(work))
    plan = decide_plan(cfg, probe(str(work)), model_size(str(tiny_model_dir))).train
    info = train_in_process(model, cfg, 7, plan, train, evals, work / "w", work / "w" / "adapter")
    return {"info": info, "adapter": Path(info.path), "test": test, "work": work}


def test_a_built_in_template_adds_its_tokens_and_says_so(tiny_model_dir, tmp_path):
    from lorapipe.data.validation import validate_dataset
    from lorapipe.models.loading import load_tokenizer
    from tests.conftest import QUICKSTART_DATA

    plain = load_tokenizer(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir), chat_template="llama3")
    assert tok.lorapipe_added_tokens == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert len(tok) == len(plain) + 3 and tok.lorapipe_chat_template_source == "builtin:llama3"
    chatml = load_tokenizer(str(tiny_model_dir), chat_template="chatml")  # the tiny vocabulary has ChatML's already
    assert chatml.lorapipe_added_tokens == [] and len(chatml) == len(plain)
    report = validate_dataset([str(QUICKSTART_DATA)], tokenizer=tok, max_seq_length=1024,
                              run_expectations=False).report
    assert report.template.added_tokens == tok.lorapipe_added_tokens and report.template.tokenizer_size == len(tok)
    assert report.audit.stop_token_trained_fraction == 1.0  # <|eot_id|> ends every answer, inside the labels
    assert any("added tokens <|start_header_id|>" in line for line in report.summary_lines())


def test_the_new_tokens_train_and_the_base_does_not_move(llama3_run, tiny_model_dir):
    from peft import PeftModel

    from lorapipe.models.loading import load_model, load_tokenizer
    from lorapipe.training.adapter import read_adapter_metadata

    adapter = llama3_run["adapter"]
    meta = read_adapter_metadata(adapter)
    assert meta["tokenizer_size"] == 1027 and meta["added_tokens"][-1] == "<|eot_id|>"
    saved = json.loads((adapter / "lorapipe_template.json").read_text())
    assert saved["chat_template_source"] == "builtin:llama3" and saved["added_tokens"] == meta["added_tokens"]
    tok = load_tokenizer(str(adapter))  # the saved tokenizer: the template and the tokens travel with the adapter
    new_ids = tok.convert_tokens_to_ids(meta["added_tokens"])
    assert new_ids == [1024, 1025, 1026] and "<|eot_id|>" in tok.chat_template
    base = load_model(str(tiny_model_dir), "float32", device="cpu", vocab_rows=1027)
    start = base.get_input_embeddings().weight.detach().clone()
    assert torch.allclose(start[1024], start[:1024].mean(0))  # a new row starts at the mean of the others
    tuned = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    after = tuned.get_input_embeddings().weight.detach()
    assert not torch.allclose(after[new_ids], start[new_ids])  # the new rows trained
    assert torch.equal(after[:1024], start[:1024])  # the old ones are the base's
    assert torch.equal(load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"],
                       start[:1024])


def test_the_merged_model_carries_the_template_and_serves_as_its_adapter(llama3_run, tmp_path):
    from lorapipe.phases.merge import merge_adapter

    out = tmp_path / "merged"
    plan = PhasePlan(phase="merge", device="cpu", dtype="float32", batch_size=1, max_seq_length=128, reason="test")
    check = merge_adapter(str(llama3_run["adapter"]), str(out), llama3_run["test"], plan, parity_samples=3,
                          parity_max_new_tokens=8)
    assert check.passed and check.serving_parity["passed"], check.serving_parity
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1027
    assert json.loads((out / "lorapipe_template.json").read_text())["chat_template_source"] == "builtin:llama3"
    merged_generation = json.loads((out / "generation_config.json").read_text())
    eot = 1026
    ends = merged_generation["eos_token_id"]
    assert eot in (ends if isinstance(ends, list) else [ends])  # generation stops on the template's turn end
