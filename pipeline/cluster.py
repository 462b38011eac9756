"""The Dask client a stage fans work out through (an existing scheduler, one worker per GPU, or CPU workers),
and :func:`run_tasks`, which runs a stage's units of work on it."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from typing import Any, NamedTuple

import dask
from distributed import Client, LocalCluster, as_completed
from distributed.comm import CommClosedError

from pipeline.catalog import ClusterSpec
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar

log = logging.getLogger(__name__)

QUIET_LOGGERS = {"distributed": "warning", "distributed.worker": "critical", "distributed.client": "critical"}


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
    levels = dict.fromkeys(QUIET_LOGGERS, "info") if verbose else QUIET_LOGGERS
    config = {"logging": levels, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(config):
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level.upper())
        yield from _client(spec, scheduler)


def _client(spec: ClusterSpec, scheduler: str | None) -> Iterator[Client]:
    address = scheduler or spec.address
    if address:
        client = _connect(address, spec)
        log.info("using the Dask scheduler at %s (%d workers)", address, len(client.scheduler_info()["workers"]))
        with client:
            yield from _guarded(client, address)
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
        yield from _guarded(client, "the local cluster")


def _connect(address: str, spec: ClusterSpec) -> Client:
    """A client of the scheduler at ``address`` that has a worker; a one-line PipelineError otherwise.

    Gives up after ``spec.connect_timeout`` seconds when the scheduler cannot be reached and after
    ``spec.worker_wait`` more when it has no worker.
    """
    for name in ("connect_timeout", "worker_wait"):
        if not getattr(spec, name) > 0:
            raise PipelineError(f"cluster.{name}: must be a positive number of seconds, got {getattr(spec, name)}")
    timeout = f"{spec.connect_timeout}s"
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": timeout}):
            client = Client(address, timeout=timeout)
    except ValueError as exc:
        raise PipelineError(
            f"--scheduler/cluster.address {address!r} is not a Dask scheduler address ({exc}); "
            "expected e.g. tcp://10.0.0.1:8786"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise PipelineError(
            f"cannot reach the Dask scheduler at {address} within {spec.connect_timeout:g} s "
            f"(cluster.connect_timeout): {exc}"
        ) from None
    try:
        client.wait_for_workers(1, timeout=spec.worker_wait)
    except (TimeoutError, OSError):
        client.close()
        raise PipelineError(
            f"the Dask scheduler at {address} has no workers after {spec.worker_wait:g} s (cluster.worker_wait); "
            f"start some with `dask worker {address}`"
        ) from None
    return client


def _guarded(client: Client, where: str) -> Iterator[Client]:
    """Yield ``client``; a scheduler lost while the stage waits on it becomes one line saying so."""
    try:
        yield client
    except PipelineError:
        raise
    except (CancelledError, CommClosedError, OSError, TimeoutError) as exc:
        if client.status == "running" and not isinstance(exc, CancelledError):
            raise
        raise PipelineError(
            f"lost the Dask scheduler of {where} mid-run ({type(exc).__name__}); the units committed so far "
            "are kept and the next run resumes from them"
        ) from None


class TaskFailure(NamedTuple):
    """A unit of work that failed on its retry too, and the error of its last try."""

    task: Any
    error: BaseException


def run_tasks(
    client: Client,
    function: Callable[[Any], int],
    tasks: Sequence[Any],
    *,
    total: int,
    desc: str,
    unit: str,
    progress: bool = False,
) -> list[TaskFailure]:
    """Run ``function(task)`` on the cluster for every task, each retried once, and wait for all of them.

    ``function`` returns how many ``unit`` (images, pairs) its task did, which advance the progress bar of
    ``total`` units. A task that fails twice does not stop the others; returns those tasks with their errors,
    in the order of ``tasks``, for the stage to report in one message.
    """
    futures = {client.submit(function, task, retries=1, pure=False): index for index, task in enumerate(tasks)}
    failed = []
    with progress_bar(enabled=progress, total=total, desc=desc, unit=unit) as bar:
        for future in as_completed(futures):
            if future.status == "error":
                failed.append((futures[future], future.exception()))
            else:
                bar.update(future.result())
    return [TaskFailure(tasks[index], error) for index, error in sorted(failed, key=lambda failure: failure[0])]
