"""The gate that holds the node's operations out while a garbage collection runs."""

from __future__ import annotations

import asyncio

import pytest

from fusenode.node.gc import Gate, GcBusy


def test_gc_waits_for_a_quiet_moment_and_holds_new_operations_out() -> None:
    async def main() -> None:
        gate = Gate()
        events: list[str] = []
        release_op = asyncio.Event()

        async def op(name: str, hold: asyncio.Event | None = None) -> None:
            async with gate.op():
                events.append(f"{name} in")
                if hold is not None:
                    await hold.wait()
                async with gate.op():  # nested: never waits while admitted
                    pass
                events.append(f"{name} out")

        async def gc() -> None:
            async with gate.exclusive(5.0):
                events.append("gc in")
                await asyncio.sleep(0.05)
                events.append("gc out")

        first = asyncio.create_task(op("first", release_op))
        await asyncio.sleep(0.01)
        collect = asyncio.create_task(gc())
        await asyncio.sleep(0.01)
        assert events == ["first in"]  # the gc waits for the operation in flight
        second = asyncio.create_task(op("second"))  # not closed yet: it runs
        await asyncio.sleep(0.01)
        assert events[-1] == "second out"
        release_op.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        third = asyncio.create_task(op("third"))  # the gc runs now: this one waits
        await asyncio.gather(first, collect, second, third)
        assert events.index("gc in") == events.index("first out") + 1
        assert events[-2:] == ["third in", "third out"]
        assert events.index("third in") > events.index("gc out")
        assert gate.active == 0

    asyncio.run(main())


def test_a_node_that_stays_busy_refuses_the_gc() -> None:
    async def main() -> None:
        gate = Gate()
        hold = asyncio.Event()

        async def busy() -> None:
            async with gate.op():
                await hold.wait()

        task = asyncio.create_task(busy())
        await asyncio.sleep(0.01)
        with pytest.raises(GcBusy, match="stayed busy"):
            async with gate.exclusive(0.05):
                pass
        hold.set()
        await task
        async with gate.op():  # the gate is open again
            pass

    asyncio.run(main())
