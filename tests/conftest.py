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
# one compute thread per process: the tiny models gain nothing from more, and the test workers (make test runs two)
# and the processes they start would otherwise each spin a thread pool the size of the machine against the others
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from lorapipe.logs import show_on_console  # noqa: E402

# lorapipe's lines on stdout, as the CLI and the steps show them: tests read them with capsys
show_on_console()

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared" / "datasets"
QUICKSTART_DATA = REPO_ROOT / "data" / "quickstart" / "wwdc25_train_slice.jsonl"
# task: classification's example data: 450 requests labelled general / sql / sports by the source they came from
CLASSIFICATION_DATA = REPO_ROOT / "data" / "classification" / "source_routing.jsonl"

requires_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets is not beside the repo")


def pytest_sessionfinish(session, exitstatus):
    import gc

    gc.unfreeze()  # the session's frozen imports (frozen_imports below), cleaned up as usual at shutdown
    shutil.rmtree(_ZEN_HOME, ignore_errors=True)


# Under pytest-xdist (make test) a test module runs in one worker process, so its module-scoped fixtures are built
# once; the modules named here share a worker with each other, for the session fixture they all use (built once per
# worker): the tiny hf adapter, the fault suite's four whole pipeline runs. (pytest-xdist's own `--dist loadgroup`
# marks no longer reach its scheduler under pytest 9: the scheduling is decided here, through its hook.)
SHARED_WORKER = {
    "tests/test_training.py": "hf_adapter",
    "tests/test_merge.py": "hf_adapter",
    "tests/test_preference_train.py": "hf_adapter",
    "tests/faults/test_kill.py": "fault_pipeline_runs",
    "tests/faults/test_preemption.py": "fault_pipeline_runs",
    "tests/faults/test_no_pickle.py": "fault_pipeline_runs",
    "tests/faults/test_secrets.py": "fault_pipeline_runs",
}


# The work units that take longest (measured: each more than half a minute of CPU), handed out first so that no
# worker starts a long one while the other has finished: the longest-first rule. The rest follow in collection order.
LONGEST_FIRST = ("fault_pipeline_runs", "tests/test_pipeline.py", "tests/test_code_cache.py",
                 "tests/faults/test_concurrent_runs.py", "tests/test_classification_train.py",
                 "tests/test_data_parallel.py", "tests/faults/test_disk_full.py", "tests/test_backend_unsloth.py",
                 "tests/test_classification_pipeline.py", "tests/test_preference_pipeline.py",
                 "tests/test_hf_backend_features.py")


def work_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return SHARED_WORKER.get(module, module)


@pytest.hookimpl(optionalhook=True)  # a plain `pytest` without pytest-xdist (or -p no:xdist) runs as well
def pytest_xdist_make_scheduler(config, log):
    """Only for --dist loadscope (the suite's `make test`): any other mode asked for on the command line is xdist's."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the order is the one the workers collected in (below)

    class ModuleScheduling(LoadScopeScheduling):
        """Whole modules (or the groups above) as work units, handed to whichever worker is free."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """In a pytest-xdist worker, the longest work units first (every worker sorts alike, as xdist requires)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def frozen_imports():
    """The libraries every test imports, imported once, their objects frozen out of the collector's way, as a
    `lorapipe` command does once a phase starts (lorapipe.short_lived): the collections lorapipe runs between phases
    then walk what the tests allocate, not torch's and ZenML's import-time objects."""
    import zenml  # noqa: F401 - imported for its import-time objects, frozen with the training libraries'

    from lorapipe.short_lived import import_and_freeze

    import_and_freeze()


@pytest.fixture(scope="session", autouse=True)
def zenml_source_root():
    """ZenML imports steps, materializers and flavors relative to its source root: this repository, as `lorapipe run`
    sets it. Set for the whole session, so a test that reads the store first (a flavor, an artifact) does not depend
    on a pipeline having run before it in the same process (pytest-xdist's workers have no main file to infer it)."""
    from zenml.utils import source_utils

    source_utils.set_custom_source_root(str(REPO_ROOT))


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
def hf_adapter(tiny_model_dir, quickstart_records, tmp_path_factory):
    """The hf backend's tiny SFT adapter, trained once for every test that needs one (training, evaluation, merge):
    one epoch of the quickstart rows, a checkpoint every 10 steps (the newest 2 kept), the base's weights read before
    training so tests can check they did not move, and what training logged."""
    import contextlib
    import sys

    from safetensors.torch import load_file

    from lorapipe.config import ModelSection, TrainSection
    from lorapipe.data.split import split_records
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe
    from lorapipe.phases.train_in_process import train_in_process

    work = tmp_path_factory.mktemp("train")
    train, evals, test = split_records(quickstart_records, 0.1, 0.1)
    model = ModelSection(name_or_path=str(tiny_model_dir))
    cfg = TrainSection(backend="hf", device="cpu", max_seq_length=128, epochs=1, learning_rate=5e-3,
                       effective_batch_size=8, save_steps=10, save_total_limit=2, output_root=str(work))
    plan = decide_plan(cfg, probe(str(work)), model_size(str(tiny_model_dir))).train
    base_before = load_file(str(tiny_model_dir / "model.safetensors"))
    out = Tee(sys.stdout)
    with contextlib.redirect_stdout(out):
        info = train_in_process(model, cfg, 7, plan, train, evals, work / "w", work / "w" / "adapter")
    return {"info": info, "plan": plan, "work": work, "test": test, "model": model, "cfg": cfg,
            "base_before": base_before, "train": train, "eval": evals, "adapter": info.path, "log": out.getvalue()}


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
