"""Faults of an external Dask cluster, with a real ``dask scheduler`` and real ``dask worker`` processes.

Every fault ends the real ``pipeline`` command in one line (no traceback), keeps the batches committed so
far, and the next run resumes to results equal to an undisturbed run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from distributed import Client

from tests.test_faults import CATALOG, results

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def pipeline(folder: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real ``pipeline`` command on ``folder``'s catalog."""
    return subprocess.run(command(folder, *args), capture_output=True, text=True, env=ENV, timeout=timeout, cwd=folder)


def command(folder: Path, *args: str) -> list[str]:
    """The command line of ``pipeline -q ARGS`` on ``folder``'s catalog, run from this clone's code."""
    main = "from pipeline.cli import main; main()"
    return [sys.executable, "-c", main, "--catalog", str(folder / "catalog.yaml"), "-q", *args]


def one_line_error(process: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failed command printed (and no traceback)."""
    assert process.returncode == 1, process.stdout + process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, process.stderr
    return errors[0]


def scheduler_tasks(dask_scheduler) -> int:
    """Run on the scheduler: how many tasks it holds."""
    return len(dask_scheduler.tasks)


class Cluster:
    """A ``dask scheduler`` and its workers, started and stopped by the test (by their own pids)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        info = folder / "scheduler.json"
        self.scheduler = self._start("scheduler", "--scheduler-file", str(info), "--port", "0", "--no-dashboard")
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.address = json.loads(info.read_text())["address"]

    def _start(self, *args: str) -> subprocess.Popen:
        log = (self.folder / f"{args[0]}-{len(self.processes)}.log").open("w")
        process = subprocess.Popen([str(Path(sys.executable).parent / "dask"), *args], env=ENV, stdout=log, stderr=log)
        self.processes.append(process)
        return process

    def add_worker(self) -> None:
        self._start("worker", self.address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard")

    def kill_scheduler(self) -> None:
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait()

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def cluster(tmp_path):
    started = Cluster(tmp_path)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def computed(tmp_path_factory) -> Path:
    """Demo features computed and the matches of an undisturbed run (by a local cluster)."""
    folder = tmp_path_factory.mktemp("computed")
    (folder / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    done = pipeline(
        folder, "run", "--stage", "download", "--stage", "normalize", "--stage", "features", "--stage", "match"
    )
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture
def demo(computed, tmp_path) -> Path:
    """The computed demo with no match results yet, and the cluster settings the tests use."""
    folder = tmp_path / "demo"
    shutil.copytree(computed, folder)
    shutil.rmtree(folder / "outputs")
    catalog = {**CATALOG, "cluster": {"worker_wait": 3, "connect_timeout": 3}}
    (folder / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    return folder


def test_a_malformed_scheduler_address_is_one_line(demo):
    error = one_line_error(pipeline(demo, "run", "--stage", "match", "--scheduler", "foo:bar:baz"))
    assert "'foo:bar:baz' is not a Dask scheduler address" in error


def test_an_unreachable_scheduler_fails_within_the_connect_timeout(demo):
    start = time.monotonic()
    process = pipeline(demo, "run", "--stage", "match", "--scheduler", "tcp://127.0.0.1:9")
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9 within 3 s" in one_line_error(process)
    assert time.monotonic() - start < 3 + 25  # the connect timeout plus the command's start-up


@pytest.mark.parametrize("stage", ["features", "match"])
def test_a_scheduler_without_workers_is_a_clear_error_after_the_wait(demo, cluster, stage):
    process = pipeline(demo, "run", "--stage", stage, "--force", "--scheduler", cluster.address)
    error = one_line_error(process)
    assert f"the Dask scheduler at {cluster.address} has no workers after 3 s" in error
    assert f"dask worker {cluster.address}" in error


def test_a_scheduler_lost_mid_run_is_one_line_and_the_next_run_resumes(demo, computed, cluster):
    cluster.add_worker()
    run = subprocess.Popen(
        command(demo, "run", "--stage", "match", "--scheduler", cluster.address),
        env=ENV, cwd=demo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with Client(cluster.address, timeout=30) as probe:  # kill the scheduler once it holds the run's tasks
        deadline = time.monotonic() + 120
        while not probe.run_on_scheduler(scheduler_tasks) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    cluster.kill_scheduler()
    stdout, stderr = run.communicate(timeout=120)
    lost = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
    if run.returncode == 0:  # the run finished before the scheduler went: nothing to resume
        pytest.skip("the match run was faster than the kill")
    assert "lost the Dask scheduler" in one_line_error(lost) and "the next run resumes" in stderr

    resumed = pipeline(demo, "run", "--stage", "match")  # a local cluster this time
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(results(demo), results(computed))
