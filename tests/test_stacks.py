"""The Dockerfile and the Kubernetes stack files in configs/stacks/, checked without Docker or a cluster.

No image is built here (there is no Docker daemon): the Dockerfile is read as text, target by target, and its
installs are compared with the Makefile's torch pin and pyproject's extras. The YAML files are checked against
ZenML 0.98's own formats and classes: the stack file is imported with `zenml stack import` into this session's
temporary store (tests/conftest.py), each component against its flavor's config class; each run configuration
against `PipelineRunConfiguration` and the settings classes it names, and then compiled with lorapipe's pipeline on
the imported orchestrator and step operator, so the tests read the pod each step really gets.
ZenML ignores keys it does not know in all of these, so the tests look for unknown keys themselves.
"""

import contextlib
import fnmatch
import inspect
import re
import warnings
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

STACKS = REPO_ROOT / "configs" / "stacks"
STACK_FILE = STACKS / "kubernetes-gpu.stack.yaml"
RUN_CONFIGS = sorted(STACKS.glob("*.run.yaml"))
# preflight plans for the GPUs its pod sees and evaluation scores on the training GPU (lorapipe/hardware/plan.py)
GPU_STEPS = {"preflight", "train_adapter", "evaluate_base_model", "evaluate_model", "score_stage_holder"}
GPU = "nvidia.com/gpu"
HF_SECRET = "lorapipe-hf"
# KubernetesPodSettings fields that hold Kubernetes objects, by the kubernetes client class that reads them
POD_OBJECT_FIELDS = {"affinity": "V1Affinity", "tolerations": "V1Toleration", "resources": "V1ResourceRequirements",
                     "volumes": "V1Volume", "volume_mounts": "V1VolumeMount", "env": "V1EnvVar",
                     "env_from": "V1EnvFromSource", "container_security_context": "V1SecurityContext"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------- Dockerfile

def dockerfile_stages() -> list[dict]:
    """Each stage of the Dockerfile in order: {"name", "runs": [RUN commands, continuations joined], "cmd"}."""
    lines, logical = [], ""
    for raw in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#"):
            continue  # comments, also between continuation lines
        logical += raw.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
        else:
            lines.append(logical.strip())
            logical = ""
    stages = []
    for line in filter(None, lines):
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            stages.append({"name": m.group(2), "image": m.group(1), "runs": [], "cmd": None})
        elif word.upper() == "RUN":
            stages[-1]["runs"].append(re.sub(r"^(--\S+\s+)+", "", rest))
        elif word.upper() == "CMD":
            stages[-1]["cmd"] = yaml.safe_load(rest)  # the exec form is a JSON list
    return stages


def stage(name: str) -> dict:
    [found] = [s for s in dockerfile_stages() if s["name"] == name]
    return found


def makefile_torch_spec() -> str:
    return re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE).group(1)


def installed_extras(runs: list[str]) -> set[str]:
    """Extras of `make setup EXTRAS=a,b` or `pip install -e ".[a,b]"`."""
    extras = set()
    for run in runs:
        for group in re.findall(r"EXTRAS=([\w,-]+)", run) + re.findall(r"\.\[([\w,-]+)\]", run):
            extras |= set(group.split(","))
    return extras


def pyproject_extra(name: str) -> dict[str, Requirement]:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]
    return {Requirement(d).name: Requirement(d) for d in deps}


def test_the_dockerfile_has_a_cuda_and_a_cpu_target_and_cpu_is_the_default():
    stages = dockerfile_stages()
    assert {"cuda", "cpu"} <= {s["name"] for s in stages}
    # `docker build -t lorapipe .` (README.md) builds the last stage: the quickstart image
    assert stages[-1]["name"] == "cpu"
    assert stage("cpu")["image"].startswith("python:3.11-slim")
    assert stage("cpu")["cmd"] == ["make", "quickstart"]
    assert stage("cuda")["image"].startswith(("nvidia/cuda:", "pytorch/pytorch:"))


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_each_target_installs_torch_first_at_the_makefiles_pin(target):
    spec = makefile_torch_spec()
    runs = stage(target)["runs"]
    pins = [(i, p) for i, run in enumerate(runs) for p in re.findall(r"TORCH_SPEC=(\S+)|(torch==[\w.+]+)", run)]
    assert pins, f"the {target} target installs no pinned torch"
    assert {a or b for _, (a, b) in pins} == {spec}, f"the Makefile pins {spec}: the Dockerfile must follow it"
    first_torch = pins[0][0]
    first_extras = next(i for i, run in enumerate(runs) if installed_extras([run]))
    assert first_torch < first_extras, "torch goes in before the extras, so nothing swaps its build"


def test_the_cuda_target_installs_unsloth_and_bitsandbytes_as_pyproject_pins_them():
    runs = stage("cuda")["runs"]
    assert {"cuda", "kubernetes"} <= installed_extras(runs)
    cuda_extra = pyproject_extra("cuda")
    assert {"unsloth", "bitsandbytes"} <= set(cuda_extra)
    for name, wanted in cuda_extra.items():
        for pinned in re.findall(rf"[\"']?({name}\s*[=<>!~][^\s\"']*)", " ".join(runs)):
            assert Requirement(pinned).specifier == wanted.specifier, f"{pinned} differs from pyproject's {wanted}"


def test_the_cpu_target_keeps_the_cpu_torch_with_the_makefiles_constraints():
    runs = stage("cpu")["runs"]
    assert "cuda" not in installed_extras(runs)
    assert {"tracking", "kubernetes"} <= installed_extras(runs)
    assert any("download.pytorch.org/whl/cpu" in run for run in runs)
    setup = next(run for run in runs if "make setup" in run)
    assert "TORCH_CONSTRAINTS=constraints/torch-cpu.txt" in setup
    assert makefile_torch_spec() in (REPO_ROOT / "constraints" / "torch-cpu.txt").read_text().split()


def test_the_run_configs_constrain_zenmls_layer_to_the_versions_the_images_wrote():
    written = {t: set(re.findall(r"> (/\S+constraints\S*\.txt)", " ".join(stage(t)["runs"]))) for t in ("cuda", "cpu")}
    assert written["cuda"] == written["cpu"] and len(written["cuda"]) == 1
    for path in RUN_CONFIGS:
        docker = load_yaml(path)["settings"]["docker"]
        assert docker["python_package_installer_args"]["constraint"] in written["cuda"], path.name


def test_dockerignore_keeps_outputs_out_and_the_code_in():
    patterns = [p.strip() for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    ignored = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
    for name in (".venv", ".git", "runs", "models", "wandb", "foo.egg-info", ".env"):
        assert ignored(name), name
    # what `make setup`, `make tiny-model` and the quickstart read inside the image
    for name in ("lorapipe", "steps", "pipelines", "materializers", "configs", "data", "constraints",
                 "pyproject.toml", "Makefile", "README.md"):
        assert not ignored(name), name


# ------------------------------------------------------------------------------------------------ ZenML stack file

@pytest.fixture(scope="module")
def imported_stack():
    """The stack file imported by ZenML's own CLI into the session's store; removed again afterwards."""
    from click.testing import CliRunner
    from zenml.cli.cli import cli
    from zenml.client import Client

    result = CliRunner().invoke(cli, ["stack", "import", str(STACK_FILE)])
    assert result.exit_code == 0, result.output
    client = Client()
    stack = client.get_stack(load_yaml(STACK_FILE)["stack_name"])
    yield stack
    with quiet_stack_deletion():
        client.delete_stack(stack.id)
    for component_type, components in stack.components.items():
        for component in components:
            client.delete_stack_component(component.id, component_type)


@contextlib.contextmanager
def quiet_stack_deletion():
    """ZenML 0.98's delete_stack makes SQLAlchemy warn that the stack's component links were already gone."""
    from sqlalchemy.exc import SAWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "DELETE statement on table 'stack_composition'", SAWarning)
        yield


def stack_components() -> list[tuple[str, dict]]:
    return [(component_type, entry) for component_type, entries in load_yaml(STACK_FILE)["components"].items()
            for entry in (entries if isinstance(entries, list) else [entries])]


def test_every_yaml_here_is_a_stack_file_or_a_run_config():
    assert RUN_CONFIGS
    deploy_configs = {p.name for p in STACKS.glob("*.deploy.yaml")}  # the inference pipeline's, tested below
    assert {p.name for p in STACKS.glob("*.yaml")} == {STACK_FILE.name} | {p.name for p in RUN_CONFIGS} | \
        deploy_configs
    for path in STACKS.glob("*.yaml"):
        assert isinstance(load_yaml(path), dict), path.name


def test_the_stack_file_has_zenmls_import_format():
    import zenml
    from zenml.enums import StackComponentType

    data = load_yaml(STACK_FILE)
    assert set(data) == {"zenml_version", "stack_name", "components"}
    assert data["zenml_version"] == zenml.__version__, "`zenml stack import` refuses another version's file"
    for component_type, entry in stack_components():
        StackComponentType(component_type)
        assert set(entry) == {"name", "flavor", "configuration"}, f"{component_type}: {entry}"


@pytest.mark.parametrize("component_type,entry", [pytest.param(t, e, id=e["name"]) for t, e in stack_components()])
def test_each_component_is_a_zenml_flavor_and_its_configuration_validates(component_type, entry):
    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.stack.flavor import Flavor

    model = Client().get_flavor_by_name_and_type(entry["flavor"], StackComponentType(component_type))
    flavor = Flavor.from_model(model)
    config_class = flavor.config_class
    unknown = set(entry["configuration"]) - set(config_class.model_fields)
    assert not unknown, f"{entry['name']}: {sorted(unknown)} are not fields of {config_class.__name__}"
    config = config_class(**entry["configuration"])
    if component_type == "orchestrator":
        from zenml.integrations.kubernetes.flavors.kubernetes_orchestrator_flavor import (
            KubernetesOrchestratorConfig,
        )

        assert isinstance(config, KubernetesOrchestratorConfig) and config.is_schedulable


def test_zenml_imports_the_stack_with_its_flavors(imported_stack):
    registered = {(t.value, c.name, c.flavor_name) for t, cs in imported_stack.components.items() for c in cs}
    assert registered == {(t, e["name"], e["flavor"]) for t, e in stack_components()}


# ----------------------------------------------------------------------------------------------- run configurations

def unknown_keys(model_class, data: dict, where: str) -> list[str]:
    fields = set(model_class.model_fields) | {f.alias for f in model_class.model_fields.values() if f.alias}
    return [f"{where}.{key}" for key in data if key not in fields]


def component_settings_class(key: str):
    from zenml.integrations.kubernetes.flavors import (
        KubernetesOrchestratorSettings,
        KubernetesStepOperatorSettings,
    )

    component_type, flavor = re.split(r"[.:]", key, maxsplit=1)
    by_name = {e["name"]: e["flavor"] for _, e in stack_components()}
    flavor = by_name.get(flavor, flavor)
    defined = {(t, e["flavor"]) for t, e in stack_components()}
    assert (component_type, flavor) in defined, \
        f"settings key {key}: the stack file has no {component_type} of that flavor or name"
    return {("orchestrator", "kubernetes"): KubernetesOrchestratorSettings,
            ("step_operator", "kubernetes"): KubernetesStepOperatorSettings}[(component_type, flavor)]


def settings_problems(settings: dict, where: str) -> list[str]:
    """Unknown keys and invalid Kubernetes objects in a `settings:` block (ZenML would drop or pass them on)."""
    from kubernetes.utils import parse_quantity
    from zenml.integrations.kubernetes.pod_settings import KubernetesPodSettings
    from zenml.integrations.kubernetes.serialization_utils import (
        deserialize_kubernetes_model,
    )
    from zenml.utils import settings_utils

    problems = []
    for key, value in settings.items():
        assert settings_utils.is_valid_setting_key(key), f"{where}: {key}"
        assert key != "resources", (f"{where}.resources: ZenML's ResourceSettings do not size Kubernetes pods (the "
                                    "orchestrator ignores them); use pod_settings.resources")
        cls = settings_utils.get_general_settings().get(key) or component_settings_class(key)
        problems += unknown_keys(cls, value, f"{where}.{key}")
        cls.model_validate(value)
        pod = value.get("pod_settings") if key != "docker" else None
        if pod:
            problems += unknown_keys(KubernetesPodSettings, pod, f"{where}.{key}.pod_settings")
            KubernetesPodSettings.model_validate(pod)
            for field, class_name in POD_OBJECT_FIELDS.items():
                given = pod.get(field)
                for obj in given if isinstance(given, list) else [given] if given else []:
                    deserialize_kubernetes_model(obj, class_name)  # KeyError on an unknown (e.g. snake_case) key
            for quantities in pod.get("resources", {}).values():
                for quantity in quantities.values():
                    parse_quantity(quantity)
    return problems


@pytest.fixture(scope="module")
def pipeline_step_names() -> set[str]:
    from pipelines.finetune import finetune

    pipeline = finetune.with_options()  # a copy: the shared pipeline object stays as it was
    pipeline.prepare(**pipeline_arguments(pipeline))
    return set(pipeline.invocations)


def pipeline_arguments(pipeline) -> dict:
    """The quickstart config for `config`, no keys set for `user_set`; the other parameters are sha256 strings that do
    not shape the DAG."""
    from lorapipe.config import load_config

    config = load_config(REPO_ROOT / "configs" / "quickstart.yaml", [])
    parameters = inspect.signature(pipeline.entrypoint).parameters
    return {name: config if name == "config" else [] if name == "user_set" else "0" * 64 for name in parameters}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_the_run_config_validates_against_zenmls_classes(path, pipeline_step_names):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.config.step_configurations import StepConfigurationUpdate

    data = load_yaml(path)
    PipelineRunConfiguration.model_validate(data)
    problems = unknown_keys(PipelineRunConfiguration, data, path.name)
    problems += settings_problems(data.get("settings") or {}, f"{path.name}:settings")
    step_operators = {e["name"] for t, e in stack_components() if t == "step_operator"}
    for step_name, step in (data.get("steps") or {}).items():
        assert step_name in pipeline_step_names, f"{path.name}: steps.{step_name} is not a step of the pipeline " \
                                                 f"({sorted(pipeline_step_names)}); ZenML would ignore it"
        problems += unknown_keys(StepConfigurationUpdate, step, f"{path.name}:steps.{step_name}")
        problems += settings_problems(step.get("settings") or {}, f"{path.name}:steps.{step_name}.settings")
        if step.get("step_operator") not in (None, False):
            assert step["step_operator"] in step_operators, f"{path.name}: {step_name} names an unknown step operator"
    assert not problems, f"keys ZenML does not know (and would ignore): {problems}"


@pytest.fixture(scope="module")
def compile_stack(imported_stack):
    """The imported orchestrator, step operator and registry with the store's local artifact store (the S3 one
    needs s3fs and boto3, which are not installed here): enough to compile, not to run."""
    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.stack import Stack

    components = {t: cs[0].id for t, cs in imported_stack.components.items() if t != StackComponentType.ARTIFACT_STORE}
    components[StackComponentType.ARTIFACT_STORE] = "default"
    client = Client()
    model = client.create_stack(name="lorapipe-k8s-gpu-compile", components=components)
    yield Stack.from_model(model)
    with quiet_stack_deletion():
        client.delete_stack(model.id)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_compiled_with_the_pipeline_the_gpu_steps_get_gpu_pods_and_the_rest_cpu_pods(path, compile_stack):
    from zenml.config.compiler import Compiler
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.utils import source_utils

    from pipelines.finetune import finetune

    source_utils.set_custom_source_root(str(REPO_ROOT))  # ZenML resolves the steps by module path from here
    pipeline = finetune.with_options(config_path=str(path))
    pipeline.prepare(**pipeline_arguments(pipeline))
    snapshot = Compiler().compile(pipeline=pipeline, stack=compile_stack,
                                  run_configuration=PipelineRunConfiguration.model_validate(load_yaml(path)))
    pods = {}
    for name, step in snapshot.step_configurations.items():
        # the settings that ZenML's orchestrator or step operator reads for this step when it makes its pod
        runner = compile_stack.step_operators[step.config.step_operator] if step.config.step_operator \
            else compile_stack.orchestrator
        pods[name] = runner.get_settings(step).pod_settings
        assert step.config.docker_settings.parent_image.endswith("/lorapipe:cuda"), name
    gpus = {name: int(pod.resources.get("limits", {}).get(GPU, 0)) for name, pod in pods.items()}
    assert {name for name, n in gpus.items() if n} == GPU_STEPS, gpus
    train, preflight = pods["train_adapter"], pods["preflight"]
    # the plan is made for the GPUs training gets: the same node type and GPU count
    assert (preflight.node_selectors, preflight.tolerations, gpus["preflight"]) == \
           (train.node_selectors, train.tolerations, gpus["train_adapter"])
    assert pods["evaluate_model"].node_selectors == pods["score_stage_holder"].node_selectors == \
           pods["evaluate_base_model"].node_selectors == train.node_selectors
    for name in GPU_STEPS:
        assert any(t.get("key") == GPU for t in pods[name].tolerations), f"{name} cannot land on a tainted GPU node"
    for name, pod in pods.items():
        assert any(e.get("secretRef", {}).get("name") == HF_SECRET for e in pod.env_from), f"{name}: no HF token"
        assert {"cpu", "memory"} <= set(pod.resources.get("requests", {})), name
        if gpus[name] > 1:  # NCCL between the processes needs more than a pod's 64 MB /dev/shm
            assert any(m.get("mountPath") == "/dev/shm" for m in pod.volume_mounts), \
                f"{name}: {gpus[name]} GPUs, and /dev/shm is the pod's 64 MB"
    launched = [step for step in snapshot.step_configurations.values() if step.config.step_operator]
    for step in launched:
        # the orchestrator pod that launches the step operator's job needs a service account allowed to create it
        assert compile_stack.orchestrator.get_settings(step).step_pod_service_account_name, step.config.name
    if not launched:
        # each pod checks its own cache, so preflight's machine fingerprint is the GPU node's
        assert compile_stack.orchestrator.get_settings(snapshot).prevent_orchestrator_pod_caching


def test_every_placeholder_is_listed_in_the_readme():
    readme = (STACKS / "README.md").read_text()
    found = {m for p in STACKS.glob("*.yaml") for m in re.findall(r"<your-[\w-]+>", p.read_text())}
    assert found and {p for p in found if p not in readme} == set()
    for _, entry in stack_components():
        assert entry["name"] in readme, f"README.md's register commands miss {entry['name']}"


def test_the_deployer_config_validates_against_zenmls_kubernetes_deployer_settings():
    """`lorapipe deploy --run-config configs/stacks/kubernetes-deployer.deploy.yaml`: a run configuration whose
    deployer settings ZenML's Kubernetes deployer reads; every key known to its settings classes, every Kubernetes
    object parsed by the kubernetes client (no cluster is reachable: not deployed)."""
    from kubernetes.utils import parse_quantity
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.integrations.kubernetes.flavors.kubernetes_deployer_flavor import KubernetesDeployerSettings
    from zenml.integrations.kubernetes.pod_settings import KubernetesPodSettings
    from zenml.integrations.kubernetes.serialization_utils import deserialize_kubernetes_model

    data = load_yaml(STACKS / "kubernetes-deployer.deploy.yaml")
    PipelineRunConfiguration.model_validate(data)
    deployer = data["settings"]["deployer.kubernetes"]
    assert not unknown_keys(KubernetesDeployerSettings, deployer, "deployer.kubernetes")
    settings = KubernetesDeployerSettings.model_validate(deployer)
    assert settings.namespace == "lorapipe" and settings.service_port == 8000
    pod = deployer["pod_settings"]
    assert not unknown_keys(KubernetesPodSettings, pod, "deployer.kubernetes.pod_settings")
    KubernetesPodSettings.model_validate(pod)
    for toleration in pod["tolerations"]:
        deserialize_kubernetes_model(toleration, "V1Toleration")
    deserialize_kubernetes_model(pod["resources"], "V1ResourceRequirements")
    assert all(parse_quantity(q) for quantities in pod["resources"].values() for q in quantities.values())
    assert pod["resources"]["limits"][GPU] == "1"
