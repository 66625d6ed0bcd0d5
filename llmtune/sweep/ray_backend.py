"""Trials on a Ray cluster (`sweep.backend: ray`, the optional extra `llmtune[ray]`).

Ray places `sweep.workers` tasks (each with `cpus_per_worker` / `gpus_per_worker`) and each runs the same trial
loop as a local sweep against the one Optuna study; so sampling, pruning, the results table and resuming are
the same as on one machine. The recipe's files and `sweep.output_dir` must be reachable at the same paths
from every node (a shared filesystem), and workers on several machines need a `sweep.storage` database they
all reach (SQLite is for one machine).
"""

from __future__ import annotations

import logging

from llmtune.errors import LlmtuneError
from llmtune.sweep.recipe import SweepRecipe

log = logging.getLogger("llmtune.sweep")


class RayUnavailableError(LlmtuneError, ImportError):
    pass


def run_on_ray(sweep: SweepRecipe, target: int) -> list[int]:
    """Run the sweep's workers as Ray tasks until the study has `target` finished trials; returns the number of
    trials each worker ran."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("sweep.backend: ray needs Ray: pip install 'llmtune[ray]'") from None
    section = sweep.section
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=section.ray_address, log_to_driver=True)
    try:
        task = ray.remote(_worker).options(num_cpus=section.cpus_per_worker, num_gpus=section.gpus_per_worker)
        log.info("running %d workers on Ray (%s)", section.workers, ray.get_runtime_context().gcs_address)
        return ray.get([task.remote(sweep, target, index) for index in range(section.workers)])
    finally:
        if started_here:
            ray.shutdown()


def _worker(sweep: SweepRecipe, target: int, index: int) -> int:
    import logging as worker_logging

    from llmtune.sweep.run import work

    worker_logging.basicConfig(level=worker_logging.INFO, format=f"worker {index} %(name)s: %(message)s")
    return work(sweep, target, worker=index)
