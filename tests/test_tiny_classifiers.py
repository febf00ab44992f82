"""The tiny classifiers (a BERT-style encoder, the tiny Llama with a score head) and the routing data set they are
tested on: built in temp folders, read back through the Auto classes exactly as a hub id would be."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, requires_shared

DATA = REPO_ROOT / "data" / "classification" / "source_routing.jsonl"
BUILDER = REPO_ROOT / "data" / "classification" / "build_source_routing.py"
LABELS = ["general", "sql", "sports"]
ID2LABEL = dict(enumerate(LABELS))
BATCH = ["Who won Super Bowl LIX?", "Write a short poem about the sea at night, in the style of a sailor's song."]
PAIR = ("How many goals did the team score?", "Describe a process of making crepes.")


def _rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    from lorapipe.models.tiny import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert", [r["text"] for r in _rows()])


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    from lorapipe.models.tiny import build_tiny_decoder_classifier

    return build_tiny_decoder_classifier(tmp_path_factory.mktemp("dec") / "tiny-llama-cls", [DATA], num_labels=3)


def _load(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, id2label=ID2LABEL,
                                                               label2id={v: k for k, v in ID2LABEL.items()}).eval()
    return tok, model


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_tiny_classifier_loads_and_classifies_a_padded_batch_and_a_pair(which, request):
    import torch

    folder = request.getfixturevalue(f"{which}_dir")
    tok, model = _load(folder)
    assert model.config.id2label == ID2LABEL and model.config.num_labels == 3
    batch = tok(BATCH, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the shorter row is padded
    pair = tok(*PAIR, truncation=True, max_length=12, return_tensors="pt")
    assert pair["input_ids"].shape[1] <= 12
    with torch.no_grad():
        logits = model(**batch).logits
        pair_logits = model(**pair).logits
        alone = model(**tok(BATCH[:1], return_tensors="pt")).logits
    assert logits.shape == (2, 3) and pair_logits.shape == (1, 3)
    # padding must not change a row's logits: the decoder reads the last non-pad token, the encoder masks pads
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-4)


def test_encoder_is_a_bert_base_with_a_fresh_head_and_pairs_get_token_type_ids(encoder_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(encoder_dir)
    assert config.model_type == "bert" and config.architectures == ["BertModel"]
    assert config.max_position_embeddings == 512
    tok, _ = _load(encoder_dir)
    enc = tok(*PAIR)
    ids, types = enc["input_ids"], enc["token_type_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.sep_token_id) == 2
    first_sep = ids.index(tok.sep_token_id)
    assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    assert tok.model_max_length == 512
    facts = json.loads((encoder_dir / "lorapipe_tiny.json").read_text())
    assert facts["architecture"] == "BertModel" and facts["num_labels"] is None


def test_encoder_with_num_labels_saves_a_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lorapipe.models.tiny import build_tiny_encoder

    folder = build_tiny_encoder(tmp_path / "cls", ["one two three", "four five six"], num_labels=4)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.architectures == ["BertForSequenceClassification"] and model.config.num_labels == 4


def test_decoder_classifier_config_has_the_pad_id(decoder_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(decoder_dir)
    tok = AutoTokenizer.from_pretrained(decoder_dir)
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert config.pad_token_id is not None and config.pad_token_id == tok.pad_token_id
    assert len(tok) > 512  # the BPE was trained on the data set's texts (a corpus the reader skipped gives ~260)


def test_source_routing_data_set():
    rows = _rows()
    assert len(rows) == 450
    assert Counter(r["label"] for r in rows) == {"general": 200, "sql": 150, "sports": 100}
    texts = [r["text"] for r in rows]
    assert all(0 < len(t) <= 300 for t in texts)
    assert len(set(texts)) == len(texts)
    assert not [r for r in rows if r["label"] == "sql" and "SELECT" in r["text"]]
    assert [r["label"] for r in rows[:20]] != sorted(r["label"] for r in rows[:20])  # interleaved, not grouped


@requires_shared
def test_source_routing_builder_reproduces_the_file(tmp_path):
    out = tmp_path / "rebuilt.jsonl"
    subprocess.run([sys.executable, str(BUILDER), str(out)], check=True, capture_output=True, cwd=REPO_ROOT)
    assert out.read_bytes() == DATA.read_bytes()
