"""The task runner choice: flags and environment, and clear errors for what cannot work."""

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from flows.task_runners import configured, task_runner


def test_thread_pool_size_and_environment(monkeypatch):
    assert isinstance(task_runner("thread", 3), ThreadPoolTaskRunner) and task_runner("thread", 3)._max_workers == 3
    monkeypatch.setenv("LMPIPE_PARALLEL_TASKS", "5")
    assert configured()._max_workers == 5 and configured(parallel_tasks=1)._max_workers == 1


def test_dask_runner_local_or_at_an_address(monkeypatch):
    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    local = task_runner("dask", 2)
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
    monkeypatch.setenv("LMPIPE_TASK_RUNNER", "dask")
    assert configured(address="tcp://scheduler:8786").address == "tcp://scheduler:8786"


def test_ray_runner_local_or_at_an_address():
    pytest.importorskip("prefect_ray")
    from prefect_ray import RayTaskRunner

    local = task_runner("ray", 3)
    assert isinstance(local, RayTaskRunner) and local.init_kwargs["num_cpus"] == 3
    assert task_runner("ray", 2, "ray://head:10001").address == "ray://head:10001"


@pytest.mark.parametrize(("args", "message"), [
    (("thread", 0), r"--parallel-tasks must be >= 1"),
    (("thread", 2, "tcp://x:8786"), r"--task-runner-address needs --task-runner dask"),
    (("slurm", 2), r"unknown task runner 'slurm'"),
])
def test_bad_choices_name_the_fix(args, message):
    with pytest.raises(ValueError, match=message):
        task_runner(*args)
