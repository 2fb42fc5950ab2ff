"""One restart policy and one supervisor loop for the worker's child processes."""

from __future__ import annotations

import asyncio

from worker.processes.supervisor import ChildSupervisor, Ended, RestartPolicy, Restarts, RunEnd


def test_the_delay_doubles_per_failure_in_a_row_up_to_the_maximum_and_resets_after_a_stable_run() -> None:
    restarts = Restarts(RestartPolicy(initial_s=0.5, max_s=3.0, stable_after_s=60.0))
    assert [restarts.after_exit(up_s=1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert restarts.after_refused_start() == 3.0
    assert restarts.after_exit(up_s=61.0) == 0.5  # it stayed up: the count starts again
    assert restarts.after_refused_start() == 1.0


async def test_a_child_that_ends_is_run_again_after_each_delay_until_stopped() -> None:
    runs = 0
    delays: list[float] = []
    third_run = asyncio.Event()
    hold = asyncio.Event()

    async def run_once() -> Ended:
        nonlocal runs
        runs += 1
        if runs == 3:
            third_run.set()
            await hold.wait()  # the third run lasts until the supervisor stops
        if runs == 2:
            return Ended(RunEnd.held)  # taken out of service: asked again at once, no failure counted
        return Ended(RunEnd.exited, delays.append)

    supervisor = ChildSupervisor("child", run_once, RestartPolicy(initial_s=0.01, max_s=0.02))
    supervisor.start()
    await asyncio.wait_for(third_run.wait(), 5)
    await supervisor.stop()
    assert runs == 3
    assert delays == [0.01]
    assert supervisor.restarts.failures == 1


async def test_a_run_that_raises_is_retried_after_backoff_rather_than_ending_supervision() -> None:
    runs = 0
    second_run = asyncio.Event()

    async def run_once() -> Ended:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("cannot start")
        second_run.set()
        await asyncio.Event().wait()  # runs until the supervisor stops
        raise AssertionError

    supervisor = ChildSupervisor("child", run_once, RestartPolicy(initial_s=0.01, max_s=0.02))
    supervisor.start()
    await asyncio.wait_for(second_run.wait(), 5)
    await supervisor.stop()
    assert runs == 2 and supervisor.restarts.failures == 1
