"""The backend catalog is the one description of each backend: the plan's refusals, the probe's packages, the
config's choices and backend selection all read it. Probes are built by hand (plain data), so these tests assert
the same on a CPU box, a CUDA box and a Mac."""

import typing

import pytest

from lorapipe.backends import get_backend
from lorapipe.catalog import BACKENDS, OPTIONAL_FEATURES, backend_spec
from lorapipe.config import EvaluateSection, MergeSection, TrainSection
from lorapipe.hardware.plan import PlanError, decide_plan
from lorapipe.hardware.probe import TRACKED_PACKAGES
from tests.model_facts import tiny_facts
from tests.test_plan import ALL, make_probe

TINY = tiny_facts()


def capable_probe(backend: str):
    """A machine on which `backend` can run with every package installed: CUDA for unsloth, a Mac for mlx."""
    if backend == "mlx":
        return make_probe(apple=True, ram_gib=64)
    return make_probe(cuda_gib=80)


def candidate_settings() -> list[tuple[str, object]]:
    """Every train.* value a user may set that some backend might not honour: each optional feature switched on,
    and every allowed value of each choice the catalog restricts."""
    fields = TrainSection.model_fields
    settings: list[tuple[str, object]] = [
        ("init_adapter", "runs/old/adapter"), ("eval_steps", 5), ("early_stopping_patience", 2),
        ("load_best_model_at_end", True), ("packing", True), ("group_by_length", True)]
    assert {k for k, _ in settings} == set(OPTIONAL_FEATURES), "a new optional feature needs a case here"
    for key in ("quantization", "optimizer", "device"):
        settings += [(key, v) for v in typing.get_args(fields[key].annotation) if v != "auto"]
    settings += [("lora.bias", v) for v in ("none", "all", "lora_only")]
    return settings


def train_section(backend: str, key: str, value: object) -> TrainSection:
    kw: dict = {"backend": backend, "max_seq_length": 128}
    if key == "lora.bias":
        kw["lora"] = {"bias": value}
    else:
        kw[key] = value
    if key in ("early_stopping_patience", "load_best_model_at_end"):
        kw["eval_steps"] = 5
    if key == "load_best_model_at_end":
        kw["save_steps"] = 10
    return TrainSection(**kw)


def supported(backend: str, key: str, value: object) -> bool:
    spec = BACKENDS[backend]
    if key in OPTIONAL_FEATURES:
        return key in spec.features
    allowed = {"quantization": spec.quantization, "optimizer": spec.optimizers, "device": spec.devices,
               "lora.bias": spec.lora_bias}[key]
    return value in allowed


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_refusal_is_named_by_the_catalog(backend):
    """For each setting: the plan refuses it on a backend exactly when the catalog says the backend lacks it, and
    every problem it raises names a key the catalog restricts for that backend."""
    restricted = set(OPTIONAL_FEATURES) | {"quantization", "optimizer", "device", "lora.bias"}
    for key, value in candidate_settings():
        train = train_section(backend, key, value)
        if key in ("eval_steps", "early_stopping_patience", "load_best_model_at_end"):
            needed = {"eval_steps"} | ({key} if key != "eval_steps" else set())
        else:
            needed = {key}
        probe = capable_probe(backend)
        if key == "device" and value == "mps":
            probe = make_probe(apple=True, ram_gib=64)
        if key == "device" and value == "cuda" and backend == "mlx":
            probe = make_probe(cuda_gib=80)
        try:
            decide_plan(train, probe, TINY)
            refused: list[str] = []
        except PlanError as err:
            refused = err.problems
        named = {p.split(" ")[0].split("=")[0].removeprefix("train.").rstrip(":") for p in refused}
        assert named <= restricted, (backend, key, value, refused)
        should_refuse = not all(supported(backend, k, value if k == key else True) for k in needed)
        assert bool(refused) == should_refuse, (backend, key, value, refused)


def test_an_option_a_backend_cannot_honour_is_refused_not_swapped():
    with pytest.raises(PlanError) as err:
        decide_plan(TrainSection(backend="mlx", optimizer="adamw_8bit", lora={"bias": "all"}),
                    make_probe(apple=True, ram_gib=64), TINY)
    problems = err.value.problems
    assert any(p.startswith("train.optimizer=adamw_8bit is not available on the mlx backend") for p in problems)
    assert any(p.startswith("train.lora.bias=all") for p in err.value.problems)


def test_plan_devices_are_values_the_config_allows():
    allowed = set(typing.get_args(TrainSection.model_fields["device"].annotation)) - {"auto"}
    probes = [make_probe(cuda_gib=24), make_probe(apple=True, ram_gib=16), make_probe(ram_gib=24),
              make_probe(ram_gib=24, packages={k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")})]
    planned: dict[str, set] = {}
    for probe in probes:
        for backend in ("auto", *BACKENDS):
            try:
                plan = decide_plan(TrainSection(backend=backend, max_seq_length=128), probe, TINY)
            except PlanError:
                continue
            devices = {plan.train.device, plan.evaluate.device, plan.merge.device}
            assert devices <= allowed, (backend, plan)
            planned.setdefault(backend, set()).update(devices)
    # the loop planned every backend on some machine, and every device the config allows came up
    assert set(planned) == {"auto", *BACKENDS} and set().union(*planned.values()) == allowed


def test_the_plan_decides_every_phase():
    cuda = decide_plan(TrainSection(max_seq_length=128), make_probe(cuda_gib=24), TINY,
                       EvaluateSection(batch_size=16), MergeSection(dtype="float16"))
    assert (cuda.train.device, cuda.train.dtype) == ("cuda", "bfloat16")
    assert (cuda.evaluate.device, cuda.evaluate.dtype, cuda.evaluate.batch_size) == ("cuda", "bfloat16", 16)
    assert (cuda.merge.device, cuda.merge.dtype, cuda.merge.batch_size) == ("cpu", "float16", 1)
    mac = decide_plan(TrainSection(max_seq_length=128), make_probe(apple=True, ram_gib=16), TINY)
    assert (mac.train.backend, mac.train.device, mac.train.dtype) == ("mlx", "mps", "bfloat16")
    assert (mac.evaluate.device, mac.evaluate.dtype) == ("cpu", "float32")


def test_the_same_machine_gives_the_same_plan_whatever_is_free_right_now():
    """The steps after preflight are cached on the plans' content: free memory must not change it."""
    busy, idle = make_probe(cuda_gib=24), make_probe(cuda_gib=24)
    busy.ram_available_gib, idle.ram_available_gib = 3.0, 60.0
    cpu_busy, cpu_idle = make_probe(ram_gib=24), make_probe(ram_gib=24)
    cpu_busy.ram_available_gib = 2.0
    for a, b in ((busy, idle), (cpu_busy, cpu_idle)):
        assert decide_plan(TrainSection(), a, TINY) == decide_plan(TrainSection(), b, TINY)


def test_only_the_backends_the_catalog_marks_data_parallel_may_train_in_several_processes():
    for spec in BACKENDS.values():
        device = "cpu"
        train = TrainSection(max_seq_length=128, backend=spec.name, device=device, processes=2)
        if spec.data_parallel:
            assert decide_plan(train, make_probe(ram_gib=24), TINY).train.world_size == 2
        else:
            with pytest.raises(PlanError, match="train.processes=2"):
                decide_plan(train, make_probe(ram_gib=24), TINY)


def test_resume_from_must_be_a_folder(tmp_path):
    with pytest.raises(PlanError, match="train.resume_from"):
        decide_plan(TrainSection(resume_from=str(tmp_path / "nope")), make_probe(cuda_gib=24), TINY)
    plan = decide_plan(TrainSection(resume_from=str(tmp_path)), make_probe(cuda_gib=24), TINY)
    assert plan.train.backend == "unsloth"


def test_auto_on_a_mac_without_mlx_trains_hf_on_the_cpu():
    no_mlx = {k: v for k, v in ALL.items() if k not in ("mlx", "mlx_lm")}
    plan = decide_plan(TrainSection(max_seq_length=128), make_probe(apple=True, ram_gib=16, packages=no_mlx), TINY)
    assert (plan.train.backend, plan.train.device, plan.train.dtype) == ("hf", "cpu", "float32")
    on_purpose = decide_plan(TrainSection(max_seq_length=128, device="mps"),
                             make_probe(apple=True, ram_gib=16, packages=no_mlx), TINY)
    assert (on_purpose.train.backend, on_purpose.train.device) == ("hf", "mps")


def test_the_config_offers_exactly_what_the_catalog_knows():
    """A value the config accepts that no backend honours would be refused everywhere; one a backend honours that
    the config rejects could never be asked for."""
    fields = TrainSection.model_fields
    assert set(typing.get_args(fields["backend"].annotation)) == {"auto", *BACKENDS}
    devices = {d for b in BACKENDS.values() for d in b.devices}
    assert set(typing.get_args(fields["device"].annotation)) == {"auto", *devices}
    for key, attr in (("quantization", "quantization"), ("optimizer", "optimizers")):
        assert set(typing.get_args(fields[key].annotation)) == {v for b in BACKENDS.values() for v in getattr(b, attr)}
    from lorapipe.config import LoraSection

    assert set(typing.get_args(LoraSection.model_fields["bias"].annotation)) == {
        v for b in BACKENDS.values() for v in b.lora_bias}


def test_the_catalog_feeds_the_config_the_probe_and_selection():
    assert set(typing.get_args(TrainSection.model_fields["backend"].annotation)) == {"auto", *BACKENDS}
    for spec in BACKENDS.values():
        assert set(spec.modules) <= set(TRACKED_PACKAGES)
        assert set(spec.features) <= set(OPTIONAL_FEATURES)
        assert "pip install" in spec.install
    with pytest.raises(ValueError, match="auto, hf, unsloth, mlx"):
        backend_spec("jax")
    assert type(get_backend("hf")).__name__ == "HFBackend" and get_backend("hf").name == "hf"


def test_the_cli_lists_the_catalog(capsys):
    import json

    from lorapipe_app.cli import main

    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in rows] == list(BACKENDS)
    mlx = next(r for r in rows if r["backend"] == "mlx")
    assert mlx["optimizers"] == ["adamw_torch", "sgd"] and mlx["devices"] == ["mps", "cpu"]
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    assert "train options it lacks (refused at preflight): init_adapter" in text
