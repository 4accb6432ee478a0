"""``streams/stacks.py``: the await chains a worker prints on SIGUSR1."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import streams.agents
from metering.embedded import TansuBroker
from streams.stacks import render_stacks, task_chain
from tests.streams.test_worker_recovery import make_settings
from tests.workers import WorkerProcess


async def _innermost(gate: asyncio.Event) -> None:
    await gate.wait()


async def _middle(gate: asyncio.Event) -> None:
    await _innermost(gate)


def test_a_tasks_chain_names_every_coroutine_down_to_what_it_awaits() -> None:
    async def main() -> list[str]:
        gate = asyncio.Event()
        task = asyncio.create_task(_middle(gate), name="waiter")
        await asyncio.sleep(0.01)
        chain = task_chain(task)
        whole = render_stacks(asyncio.get_running_loop())
        gate.set()
        await task
        assert "TASK waiter" in whole
        return chain

    chain = asyncio.run(main())
    # Faust's own dump (SIGUSR1) shows only the outermost frame: _middle
    assert [line.rsplit(" in ", 1)[-1] for line in chain[:3]] == ["_middle", "_innermost", "wait"]
    assert chain[-1].startswith("  awaiting <Future pending")


@pytest.mark.integration
def test_a_running_worker_shows_its_agents_waiting_for_input(broker: TansuBroker,
                                                             tmp_path: Path) -> None:
    # no input: both stream agents wait in their batch loop, which is what a stuck worker's
    # dump has to tell apart from waiting for Kafka's acknowledgements
    w = WorkerProcess(make_settings(broker, "stacks."), tmp_path).start()
    try:
        deadline = time.monotonic() + 60
        while "Worker ready" not in w.log_path.read_text(errors="replace"):
            assert w.alive() and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.5)
        stacks = w.dump_stacks()
        assert w.alive()
    finally:
        w.stop()
    agents = Path(streams.agents.__file__)
    batch_loops = {n for n, line in enumerate(agents.read_text().splitlines(), 1)
                   if "async for events in stream.take_events(" in line}
    waiting = {(int(line.split(", line ")[1].split(",")[0]), line.rsplit(" in ", 1)[1])
               for line in stacks.splitlines() if f'File "{agents}"' in line}
    # each agent's chain ends in its agent function on the line of its batch loop
    assert {agent for n, agent in waiting if n in batch_loops} == {"normalize", "windows"}, stacks
