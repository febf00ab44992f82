import pytest

from lorapipe.config import ConfigError, load_config, validate_config
from tests.conftest import REPO_ROOT


def test_every_shipped_config_validates_without_weights():
    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))  # configs/stacks/ holds ZenML run configurations
    assert configs, "configs/ holds no YAML"
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.name_or_path


def test_every_config_names_a_model_a_user_can_load():
    """A valid hub id (huggingface_hub's own validator: no spaces, no '#', at most one '/') or, for a local path,
    the folder `make tiny-model` builds. YAML needs a space before '#', or the comment becomes part of the id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lorapipe_app.api import REGISTERED_VERSION

    makefile = (REPO_ROOT / "Makefile").read_text()
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        name = load_config(path).model.name_or_path
        if REGISTERED_VERSION.fullmatch(name):  # a registered version (MODEL:STAGE), resolved when the run starts
            assert load_config(path).task == "preference", f"{path.name}: {name}"
            continue
        if name.startswith(("models/", "./", "/")):
            assert any(f"{var} := {name}" in makefile for var in ("TINY_MODEL", "TINY_ENCODER")) or \
                (REPO_ROOT / name).is_dir(), f"{path.name}: {name}"
            continue
        try:
            validate_repo_id(name)
        except HFValidationError as exc:
            raise AssertionError(f"{path.name}: model.name_or_path {name!r} is not a hub id: {exc}") from None
        assert name.count("/") == 1, f"{path.name}: {name!r} should be owner/name"


def test_every_config_starts_with_the_command_that_runs_it():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run: lorapipe run -c configs/"), f"{path.name}: {first}"


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        validate_config({"model": {"name_or_path": "x"}, "data": {"paths": ["a.jsonl"]},
                         "train": {"lora": {"rnak": 8}}})
    msg = str(err.value)
    assert "train.lora.rnak" in msg
    assert "allowed keys here: alpha, bias, dropout, r, target_modules" in msg


def test_bad_value_names_the_allowed_values_and_all_problems_are_collected():
    with pytest.raises(ConfigError) as err:
        validate_config({"model": {"name_or_path": "x"}, "data": {"paths": ["a.jsonl"]},
                         "train": {"backend": "cuda", "quantization": "4bit"}})
    msg = str(err.value)
    assert "train.backend" in msg and "'auto', 'hf', 'unsloth' or 'mlx'" in msg
    assert "train.quantization" in msg and "'none', 'nf4' or 'int8'" in msg
    assert len(err.value.problems) == 2


def test_overrides_are_validated_like_the_file(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "quickstart.yaml", ["train.epochs=2", "evaluate.max_new_tokens=7"])
    assert cfg.train.epochs == 2 and cfg.evaluate.max_new_tokens == 7
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs" / "quickstart.yaml", ["train.epoch=2"])
    assert "unknown key 'train.epoch'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs" / "quickstart.yaml", ["train.epochs"])
    assert "dotted.key=value" in str(err.value)


def test_split_fractions_must_leave_training_rows():
    with pytest.raises(ConfigError) as err:
        validate_config({"model": {"name_or_path": "x"}, "data": {"paths": ["a"]},
                         "split": {"eval_fraction": 0.5, "test_fraction": 0.45}})
    assert "split" in str(err.value) and "10%" in str(err.value)
