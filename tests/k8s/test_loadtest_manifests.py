"""k8s/loadtest (Locust master Job + Service, workers Job): rendered with the project's kubectl,
validated strictly, and held together: the master waits for as many workers as the workers Job
runs, the workers reach the master through the Service."""

from __future__ import annotations

import pytest

from k8s.tools.loadgen import flag_value, is_master, is_workers
from k8s.tools.render import find, render_overlay
from k8s.tools.validate import LOADTEST, check_loadtest_objects

from .conftest import REPO, edit

pytestmark = pytest.mark.usefixtures("kubectl")


def problems_of(repo):
    return check_loadtest_objects(render_overlay(repo / LOADTEST), repo, "1.35.0")


def _args(job: dict) -> list[str]:
    c = job["spec"]["template"]["spec"]["containers"][0]
    return [*c.get("command", []), *c["args"]]


def test_rendered_master_waits_for_the_workers_job():
    objects = render_overlay(REPO / LOADTEST)
    assert check_loadtest_objects(objects, REPO, "1.35.0") == []
    master, workers = find(objects, "Job", "locust-master"), find(objects, "Job", "locust-workers")
    assert is_master(master) and is_workers(workers)
    expect = int(flag_value(_args(master), "--expect-workers"))
    assert expect == workers["spec"]["parallelism"] == workers["spec"]["completions"] > 1
    svc = find(objects, "Service", "locust-master")
    assert flag_value(_args(workers), "--master-host") == svc["metadata"]["name"]
    assert svc["spec"]["ports"][0]["port"] == int(flag_value(_args(master), "--master-bind-port"))
    labels = master["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    for job in (master, workers):
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
        assert {"backoffLimit", "ttlSecondsAfterFinished"} <= set(job["spec"])
    ns = find(objects, "Namespace")
    assert ns["metadata"]["labels"]["segserve.io/inference-client"] == "true"
    assert all(o["metadata"].get("namespace") == "segserve-loadtest" for o in objects if o != ns)


def test_worker_count_drift_is_named(repo_copy):
    edit(repo_copy / LOADTEST / "workers-job.yaml", "parallelism: 4", "parallelism: 3")
    problems = problems_of(repo_copy)
    assert any(
        "Job/segserve-loadtest/locust-master: --expect-workers 4" in p and "parallelism 3" in p
        for p in problems
    ), problems


def test_workers_pointed_elsewhere_are_named(repo_copy):
    edit(repo_copy / LOADTEST / "workers-job.yaml", "- locust-master\n", "- locust-mastr\n")
    problems = problems_of(repo_copy)
    assert any("--master-host locust-mastr is no Service" in p for p in problems), problems


def test_master_options_are_loadtest_runs(repo_copy):
    edit(repo_copy / LOADTEST / "master-job.yaml", "- --spawn-rate\n", "- --spawn-speed\n")
    problems = problems_of(repo_copy)
    assert any("--spawn-speed is not an option of loadtest.run" in p for p in problems), problems


def test_job_that_restarts_or_misspells_a_field_fails(repo_copy):
    job = repo_copy / LOADTEST / "master-job.yaml"
    edit(job, "restartPolicy: Never", "restartPolicy: OnFailure")
    edit(job, "ttlSecondsAfterFinished: 86400", "ttlSecondsAfterFinish: 86400")
    problems = problems_of(repo_copy)
    assert any("restartPolicy must be Never" in p for p in problems), problems
    assert any("ttlSecondsAfterFinish" in p and "locust-master" in p for p in problems)


def test_namespace_without_the_inference_client_label_fails(repo_copy):
    ns = repo_copy / LOADTEST / "namespace.yaml"
    edit(ns, 'segserve.io/inference-client: "true"', 'segserve.io/inference-client: "no"')
    problems = problems_of(repo_copy)
    assert any("segserve.io/inference-client=true" in p for p in problems), problems
