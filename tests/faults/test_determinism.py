"""Determinism: on the CPU, two trainings with the same seed and data write the same adapter bytes (the property every
resume test here relies on), and another seed writes other bytes (the hash does see the training)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.faults import SEED, adapter_sha256
from tests.faults.conftest import train_captured

pytestmark = pytest.mark.slow


def test_the_same_seed_and_data_give_the_same_adapter_bytes(tiny_model_dir, reference, tmp_path):
    info, _ = train_captured(tiny_model_dir, tmp_path / "again")
    assert adapter_sha256(info.path) == reference.sha
    weights = load_file(f"{info.path}/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "the adapter must have moved"


def test_another_seed_gives_another_adapter(tiny_model_dir, reference, tmp_path):
    info, _ = train_captured(tiny_model_dir, tmp_path / "other", seed=SEED + 1)
    assert adapter_sha256(info.path) != reference.sha
