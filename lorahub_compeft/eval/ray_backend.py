"""Cells on Ray: a fixed set of actors (the concurrency cap), each loading its model once and
keeping it for every cell it is given. Ray is started here when no instance is running (and
shut down at the end), or joined at `address`."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _gpus(ray, gpus_per_cell: float | None) -> float:
    """Explicit, or one per cell when the cluster has GPUs: Ray hides GPUs from a task that
    did not ask for them."""
    available = ray.cluster_resources().get("GPU", 0)
    if gpus_per_cell is None:
        return 1 if available else 0
    if gpus_per_cell > available:
        raise ValueError(f"--gpus-per-cell {gpus_per_cell} but the Ray cluster has {available:g} "
                         "GPUs; lower it (0 runs on CPUs)")
    return gpus_per_cell


def run_on_ray(cells, workers: int, address: str | None, gpus_per_cell: float | None,
               batch_size: int):
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ValueError('the ray backend needs Ray: pip install -e ".[ray]"') from None
    from lorahub_compeft.eval.worker import Worker
    started_here = not ray.is_initialized()
    if started_here:
        # "local": a new instance of our own, never another user's Ray found on this machine
        ray.init(address=address or "local", log_to_driver=False)
    actors = []
    try:
        gpus = _gpus(ray, gpus_per_cell)
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(Worker)
        actors = [actor.remote(batch_size) for _ in range(min(workers, len(cells)))]
        log.info("ray: %d actors, %g GPU each, %d cells", len(actors), gpus, len(cells))
        yield from ActorPool(actors).map_unordered(lambda a, cell: a.run.remote(cell), cells)
    finally:
        for a in actors:
            ray.kill(a)
        if started_here:
            ray.shutdown()
