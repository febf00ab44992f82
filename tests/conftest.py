"""Shared fixtures. The ZenML store is a real SQLite store in a temp folder for this test session only:
ZENML_CONFIG_PATH is set before anything imports zenml, so the user's home config is never touched."""

import io
import os
import shutil
import tempfile
from pathlib import Path

_ZEN_HOME = tempfile.mkdtemp(prefix="lorapipe-zenml-test-")
os.environ["ZENML_CONFIG_PATH"] = _ZEN_HOME
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["ZENML_LOGGING_VERBOSITY"] = "WARN"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# wandb/weave report their own errors to an outside service at import time; nothing here may call out
os.environ["WANDB_ERROR_REPORTING"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("ZENML_STORE_URL", None)

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared" / "datasets"
QUICKSTART_DATA = REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
# task: classification's example data: 450 requests labelled general / sql / sports by the source they came from
CLASSIFICATION_DATA = REPO_ROOT / "data" / "classification" / "source_routing.jsonl"

requires_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets is not beside the repo")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_ZEN_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The deterministic tiny Llama, built in-process and saved with save_pretrained."""
    from lorapipe.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", [QUICKSTART_DATA])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from lorapipe.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A tiny random BERT-style encoder (no head) with a WordPiece tokenizer trained on the classification data, as
    `lorapipe build-tiny-model --encoder` builds it: AutoModelForSequenceClassification adds the head."""
    from lorapipe.data.formats import read_records
    from lorapipe.models.tiny import build_tiny_encoder

    texts = [r.text for r in read_records([str(CLASSIFICATION_DATA)]).records]
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-encoder", texts)


@pytest.fixture(scope="session")
def quickstart_records():
    from lorapipe.data.formats import read_records

    return read_records([str(QUICKSTART_DATA)]).records


def write_lines(path: Path, lines: list, mode: str = "w") -> Path:
    """Write raw lines (str or bytes) exactly as given, for the broken-file corpus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines and isinstance(lines[0], bytes):
        path.write_bytes(b"".join(lines))
    else:
        path.write_text("".join(lines), encoding="utf-8")
    return path


class Tee(io.StringIO):
    """Captures what a training prints and passes it on (visible when a test fails)."""

    def __init__(self, other):
        super().__init__()
        self.other = other

    def write(self, s):
        self.other.write(s)
        return super().write(s)
