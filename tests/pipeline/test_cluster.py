"""run_tasks on a real local Dask cluster: every task runs, a failure is retried once, failures are collected."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from pipeline.catalog import ClusterSpec
from pipeline.cluster import TaskFailure, dask_client, run_tasks


class Work(NamedTuple):
    """A test task: its name, its folder, how many of its first tries fail, and how many units it does."""

    name: str
    folder: str
    failing_tries: int = 0
    units: int = 1


def do_work(work: Work) -> int:
    """Record the try in ``<folder>/<name>`` (one line each); fail the first ``failing_tries`` tries."""
    log = Path(work.folder) / work.name
    with log.open("a") as file:
        file.write("try\n")
    tries = len(log.read_text().splitlines())
    if tries <= work.failing_tries:
        raise ValueError(f"{work.name} failed on try {tries}")
    return work.units


def tries(work: Work) -> int:
    """How many times ``work`` ran."""
    path = Path(work.folder) / work.name
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def client():
    """A local cluster of two one-thread workers in this process (the real ``dask_client``)."""
    with dask_client(ClusterSpec(n_workers=2, processes=False)) as client:
        yield client


def test_every_task_runs_once_when_none_fails(client, tmp_path):
    tasks = [Work(f"task{i}", str(tmp_path), units=i) for i in range(5)]
    assert run_tasks(client, do_work, tasks, total=10, desc="work", unit="it") == []
    assert [tries(task) for task in tasks] == [1] * 5


def test_a_task_that_fails_once_is_retried_and_succeeds(client, tmp_path):
    tasks = [Work("flaky", str(tmp_path), failing_tries=1), Work("steady", str(tmp_path))]
    assert run_tasks(client, do_work, tasks, total=2, desc="work", unit="it") == []
    assert (tries(tasks[0]), tries(tasks[1])) == (2, 1)


def test_tasks_that_fail_twice_are_returned_in_task_order_after_the_others_finish(client, tmp_path):
    tasks = [
        Work("late", str(tmp_path), failing_tries=9),
        Work("fine", str(tmp_path)),
        Work("early", str(tmp_path), failing_tries=9),
        Work("flaky", str(tmp_path), failing_tries=1),
    ]
    failures = run_tasks(client, do_work, tasks, total=4, desc="work", unit="it")
    assert [failure.task for failure in failures] == [tasks[0], tasks[2]]
    assert all(isinstance(failure, TaskFailure) for failure in failures)
    assert [str(failure.error) for failure in failures] == ["late failed on try 2", "early failed on try 2"]
    assert [tries(task) for task in tasks] == [2, 1, 2, 2]  # tried once and retried once, no more


def test_the_progress_bar_is_shown_only_when_asked(client, tmp_path, capsys):
    tasks = [Work(f"task{i}", str(tmp_path)) for i in range(3)]
    run_tasks(client, do_work, tasks[:1], total=7, desc="quiet work", unit="pair")
    assert "quiet work" not in capsys.readouterr().err
    run_tasks(client, do_work, tasks[1:], total=7, desc="shown work", unit="pair", progress=True)
    shown = capsys.readouterr().err
    assert "shown work" in shown and "/7" in shown and "pair" in shown
