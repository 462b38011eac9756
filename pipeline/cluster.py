"""The Dask client a stage fans work out through: an existing scheduler, one worker per GPU, or CPU workers."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from pipeline.catalog import ClusterSpec
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

QUIET_LOGGERS = {"distributed": "warning", "distributed.worker": "critical"}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def dask_client(spec: ClusterSpec, scheduler: str | None = None) -> Iterator[Client]:
    """A client for the run, closed (with any cluster it started) on exit.

    Order of choice: ``scheduler`` (``--scheduler``), else the catalog's ``cluster.address``; else a
    LocalCUDACluster with one worker per GPU when GPUs and dask-cuda are present; else a LocalCluster of
    ``n_workers`` CPU workers (default: one per core, at most 4) with ``threads_per_worker`` threads each.
    """
    # Workers inherit this config: they log only warnings unless the run is verbose, and a worker takes a
    # new task only when a thread is free (the default 1.1 queues two tasks on a one-thread worker while
    # another worker idles).
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    # A task that fails is reported by its stage in one line, so the worker's "Compute Failed" traceback
    # is shown only when verbose.
    levels = {"distributed": "info", "distributed.worker": "info"} if verbose else QUIET_LOGGERS
    config = {"logging": levels, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(config):
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level.upper())
        yield from _client(spec, scheduler)


def _client(spec: ClusterSpec, scheduler: str | None) -> Iterator[Client]:
    address = scheduler or spec.address
    if address:
        try:
            client = Client(address, timeout="20s")
        except OSError as exc:
            raise PipelineError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        log.info("using the Dask scheduler at %s (%d workers)", address, len(client.scheduler_info()["workers"]))
        with client:
            yield client
        return
    gpus = _gpu_count()
    if gpus and importlib.util.find_spec("dask_cuda") is not None:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(n_workers=spec.n_workers or gpus, threads_per_worker=spec.threads_per_worker)
        log.info("started a LocalCUDACluster with %d GPU worker(s)", len(cluster.workers))
    else:
        if gpus:
            log.warning("%d GPU(s) found but dask-cuda is not installed: one local worker will use GPU 0", gpus)
        n_workers = spec.n_workers or (1 if gpus else min(os.cpu_count() or 1, 4))
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=spec.threads_per_worker,
            processes=spec.processes,
            dashboard_address=":0",  # any free port: parallel runs never collide
        )
        log.info("started a LocalCluster with %d worker(s)", n_workers)
    with cluster, Client(cluster) as client:
        yield client
