"""Which Prefect task runner executes the pipeline's task runs (stage builds, score/extraction shards, variants).

- `thread` (default): Prefect's ThreadPoolTaskRunner in this process; torch releases the GIL, so builds overlap.
- `dask`: prefect-dask's DaskTaskRunner: a local dask.distributed cluster of `parallel_tasks` single-threaded
  worker processes, or the scheduler at `address` (tcp://host:8786) of an existing cluster.
- `ray`: prefect-ray's RayTaskRunner: a local Ray instance with `parallel_tasks` CPUs (one per task run; Ray
  gives each worker one thread), or the cluster at `address` (ray://head:10001).
Workers on other machines must see the same artifacts (a shared file system, or an object-store LMPIPE_ROOT with
each machine's own mirror) and the same Prefect API.
"""

import os

from prefect.task_runners import ThreadPoolTaskRunner

TASK_RUNNERS = ("thread", "dask", "ray")
DEFAULT_PARALLEL_TASKS = 2
"""Task runs at once on the default thread pool (and workers of a local Dask cluster). Two matches 2-core CPUs;
raise it on a GPU box with spare memory."""


def configured(kind: str | None = None, parallel_tasks: int | None = None, address: str | None = None):
    """task_runner() with what is not given taken from LMPIPE_TASK_RUNNER, LMPIPE_PARALLEL_TASKS and
    LMPIPE_TASK_RUNNER_ADDRESS (so `lmpipe serve`'s deployments follow them too), then the defaults."""
    if parallel_tasks is None:  # not `or`: 0 is an error, not "the default"
        text = os.environ.get("LMPIPE_PARALLEL_TASKS", str(DEFAULT_PARALLEL_TASKS))
        try:
            parallel_tasks = int(text)
        except ValueError:
            parallel_tasks = 0
        if parallel_tasks < 1:
            raise ValueError(f"LMPIPE_PARALLEL_TASKS must be a whole number >= 1, got {text!r}")
    return task_runner(kind or os.environ.get("LMPIPE_TASK_RUNNER", "thread"), parallel_tasks,
                       address or os.environ.get("LMPIPE_TASK_RUNNER_ADDRESS") or None)


def task_runner(kind: str = "thread", parallel_tasks: int = DEFAULT_PARALLEL_TASKS, address: str | None = None):
    """The Prefect task runner for `kind`; ValueError naming the package to install when it is missing."""
    if parallel_tasks < 1:
        raise ValueError(f"--parallel-tasks must be >= 1, got {parallel_tasks}")
    if kind == "thread":
        if address:
            raise ValueError("--task-runner-address needs --task-runner dask or ray")
        return ThreadPoolTaskRunner(max_workers=parallel_tasks)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError("--task-runner dask needs prefect-dask: pip install -e '.[cluster]'") from None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": parallel_tasks, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ValueError("--task-runner ray needs prefect-ray: pip install -e '.[ray]'") from None
        if address:
            return RayTaskRunner(address=address)
        return RayTaskRunner(init_kwargs={"num_cpus": parallel_tasks, "include_dashboard": False,
                                          "log_to_driver": False})
    raise ValueError(f"unknown task runner {kind!r}; choose one of {TASK_RUNNERS}")
