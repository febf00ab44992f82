"""Scheduled retraining: refused with the way out on a stack that cannot schedule; registered through ZenML's real
`Schedule` handling on one that can. The schedulable orchestrator is a test stand-in that records what ZenML asks
of it and runs nothing (no cluster is reachable here; see tests/schedulable_orchestrator.py)."""

import json

import pytest
import yaml

from lorapipe_app.cli import main
from tests.conftest import QUICKSTART_DATA, REPO_ROOT

CRON = "0 3 * * *"


@pytest.fixture()
def config(tiny_model_dir, tmp_path):
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "2026-11-01.jsonl").write_bytes(QUICKSTART_DATA.read_bytes())
    cfg["data"]["paths"] = [str(drops / "*.jsonl")]  # each firing reads whatever has landed by then
    cfg["train"].update(backend="hf", device="cpu", output_root=str(tmp_path / "runs"))
    cfg["register"]["model_name"] = "lorapipe-scheduled"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def schedulable_stack(tmp_path):
    """A stack whose orchestrator can schedule, active for one test; the default stack is back afterwards."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    from lorapipe_app.api import use_repo_as_source_root
    from tests.schedulable_orchestrator import FLAVOR

    use_repo_as_source_root()
    client = Client()
    if not client.list_flavors(name=FLAVOR).items:
        client.create_flavor(source="tests.schedulable_orchestrator.RecordingOrchestratorFlavor",
                             component_type=StackComponentType.ORCHESTRATOR)
    record = tmp_path / "orchestrator_record.json"
    name = f"recording-{tmp_path.name}"[:60]
    client.create_stack_component(name=name, flavor=FLAVOR, component_type=StackComponentType.ORCHESTRATOR,
                                  configuration={"record_file": str(record)})
    client.create_stack(name=name, components={StackComponentType.ORCHESTRATOR: name,
                                               StackComponentType.ARTIFACT_STORE: "default"})
    client.activate_stack(name)
    try:
        yield record
    finally:
        client.activate_stack("default")


def _runs() -> int:
    from zenml.client import Client

    return Client().list_pipeline_runs(size=1).total


def test_a_stack_that_cannot_schedule_is_refused_with_the_stacks_that_can_and_the_cron_line(config, capsys):
    assert main(["schedule", "-c", str(config), "--cron", CRON, "--set", "train.epochs=2"]) == 1
    err = capsys.readouterr().err
    assert "local orchestrator, which cannot run schedules" in err
    assert "kubernetes" in err and "vertex" in err and "configs/stacks/kubernetes-gpu.stack.yaml" in err
    cron_line = next(line.strip() for line in err.splitlines() if line.strip().startswith(CRON))
    assert f"lorapipe run -c {config} --set train.epochs=2" in cron_line  # the same run, overrides and all
    assert "Traceback" not in err


def test_a_malformed_cron_expression_is_explained(config, capsys):
    assert main(["schedule", "-c", str(config), "--cron", "every night"]) == 1
    assert "five fields" in capsys.readouterr().err


def test_schedule_needs_a_config_and_a_cron(capsys):
    assert main(["schedule", "--cron", CRON]) == 2
    assert "needs -c CONFIG and --cron" in capsys.readouterr().err


def test_a_schedule_is_registered_runs_nothing_now_and_can_be_listed_and_deleted(config, schedulable_stack, tmp_path,
                                                                                 capsys):
    from zenml.client import Client

    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({"steps": {"train_adapter": {"settings": {"resources": {"cpu_count": 8}}}}}))
    runs_before = _runs()
    assert main(["schedule", "-c", str(config), "--cron", CRON, "--name", "nightly",
                 "--run-config", str(run_config)]) == 0
    assert "schedule nightly" in capsys.readouterr().out
    assert _runs() == runs_before  # registered, not run

    submitted = json.loads(schedulable_stack.read_text())[-1]
    assert submitted["event"] == "submit" and submitted["pipeline"] == "finetune"
    assert submitted["schedule"]["name"] == "nightly" and submitted["schedule"]["cron"] == CRON
    # the data source is resolved when the schedule fires, by the first step; the glob travels unexpanded
    assert submitted["steps"][0] == "resolve_data_source" and "train_adapter" in submitted["steps"]
    assert submitted["parameters"]["config"]["data"]["paths"][0].endswith("drops/*.jsonl")
    assert submitted["model"]["name"] == "lorapipe-scheduled" and submitted["model"]["version"] is None
    assert submitted["step_settings"]["train_adapter"]["resources"]["cpu_count"] == 8

    stored = Client().get_schedule("nightly", allow_name_prefix_match=False)
    assert stored.cron_expression == CRON and stored.active

    assert main(["schedule", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["cron"] for s in listed if s["name"] == "nightly"] == [CRON]

    assert main(["schedule", "-c", str(config), "--cron", CRON, "--name", "nightly"]) == 1
    assert "exists already" in capsys.readouterr().err

    assert main(["schedule", "delete", "nightly"]) == 0
    assert json.loads(schedulable_stack.read_text())[-1] == {"event": "delete", "schedule": "nightly"}
    assert "schedule nightly deleted" in capsys.readouterr().out
    assert main(["schedule", "list", "--json"]) == 0
    assert "nightly" not in [s["name"] for s in json.loads(capsys.readouterr().out)]
    assert main(["schedule", "delete", "nightly"]) == 1


def test_a_schedule_may_wait_for_its_first_drop_but_a_run_needs_data_now(config, schedulable_stack, capsys):
    cfg = yaml.safe_load(config.read_text())
    empty = config.parent / "later"
    empty.mkdir()
    cfg["data"]["paths"] = [str(empty / "*.jsonl")]
    config.write_text(yaml.safe_dump(cfg))
    assert main(["schedule", "-c", str(config), "--cron", CRON, "--name", "waits-for-data"]) == 0
    assert main(["schedule", "delete", "waits-for-data"]) == 0
    capsys.readouterr()
    assert main(["run", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "matches no file" in err and "data.paths" in err


def test_on_kubernetes_the_schedule_becomes_a_cronjob_for_lorapipes_pipeline(config, schedulable_stack, monkeypatch):
    """ZenML's Kubernetes orchestrator turns the schedule's snapshot into a CronJob. The Kubernetes API client is
    mocked at the network boundary (as ZenML's own tests do); the image is a placeholder, since no registry is
    reachable to build one (the Dockerfile's cuda target is what a real stack runs)."""
    from unittest import mock

    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.integrations.kubernetes.orchestrators.kubernetes_orchestrator import (
        KubernetesOrchestrator,
    )
    from zenml.stack import StackComponent

    assert main(["schedule", "-c", str(config), "--cron", CRON, "--name", "nightly-k8s"]) == 0
    snapshot_id = json.loads(schedulable_stack.read_text())[-1]["snapshot_id"]
    client = Client()
    snapshot = client.get_snapshot(snapshot_id)
    name = f"k8s-{schedulable_stack.parent.name}"[:60]
    client.create_stack_component(name=name, flavor="kubernetes", component_type=StackComponentType.ORCHESTRATOR,
                                  configuration={"kubernetes_context": "lorapipe-test", "kubernetes_namespace": "ml"})
    orchestrator = StackComponent.from_model(client.get_stack_component(StackComponentType.ORCHESTRATOR, name))
    assert isinstance(orchestrator, KubernetesOrchestrator) and orchestrator.config.is_schedulable

    batch_api, core_api, rbac_api = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    batch_api.create_namespaced_cron_job.side_effect = lambda body, namespace: body  # the API echoes the object
    monkeypatch.setattr(KubernetesOrchestrator, "_k8s_batch_api", property(lambda self: batch_api))
    monkeypatch.setattr(KubernetesOrchestrator, "_k8s_core_api", property(lambda self: core_api))
    monkeypatch.setattr(KubernetesOrchestrator, "_k8s_rbac_api", property(lambda self: rbac_api))
    image = "registry.example.com/lorapipe:cuda"
    monkeypatch.setattr(orchestrator, "get_image", lambda snapshot, step_name=None: image)

    result = orchestrator.submit_pipeline(snapshot=snapshot, stack=client.active_stack, base_environment={},
                                          step_environments={}, placeholder_run=None)

    batch_api.create_job.assert_not_called()  # scheduled, not run now
    (call,) = batch_api.create_namespaced_cron_job.call_args_list
    cron_job, namespace = call.kwargs["body"], call.kwargs["namespace"]
    assert namespace == "ml" and cron_job.kind == "CronJob"
    assert cron_job.spec.schedule == CRON
    pod = cron_job.spec.job_template.spec.template.spec
    (container,) = pod.containers
    assert container.image == image
    assert "kubernetes_orchestrator_entrypoint" in " ".join(container.command + container.args)
    assert str(snapshot.id) in container.args  # the pod runs this very snapshot: lorapipe's steps, its config
    assert cron_job.spec.job_template.spec.template.metadata.labels["pipeline"] == "finetune"
    assert result.metadata  # ZenML records the CronJob's name on the schedule, for updates and deletion
    assert main(["schedule", "delete", "nightly-k8s"]) == 0
