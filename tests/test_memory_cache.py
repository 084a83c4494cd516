"""KVCachePool: bounded attention-cache reservations that wait up to a timeout, then fail clearly."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.server.memory_cache import CacheAllocationError, KVCachePool


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_reserve_within_capacity() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        assert pool.bytes_left == 1000
        async with pool.reserve(600, timeout=0):
            assert pool.bytes_used == 600 and pool.bytes_left == 400
            async with pool.reserve(400, timeout=0):
                assert pool.bytes_left == 0
            assert pool.bytes_left == 400
        assert pool.bytes_used == 0 and pool.bytes_left == 1000

    run(main())


async def fails_without_waiting(reservation) -> pytest.ExceptionInfo:
    """Enter `reservation` in a task: it must have failed with CacheAllocationError by the loop's next turn."""

    async def enter() -> None:
        async with reservation:
            pytest.fail("should not be reached")

    task = asyncio.create_task(enter())
    await asyncio.sleep(0)  # one turn of the loop: the task runs until it waits, or ends
    assert task.done(), "the reservation waited"
    with pytest.raises(CacheAllocationError) as info:
        task.result()
    return info


def test_over_capacity_fails_immediately_naming_sizes() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        # No waiting, even with an hour to wait: it can never fit. It fails without yielding to the loop.
        info = await fails_without_waiting(pool.reserve(1001, timeout=3600))
        assert "1001" in str(info.value) and "1000" in str(info.value)
        assert pool.bytes_used == 0

    run(main())


def test_timeout_zero_fails_immediately_when_full() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        async with pool.reserve(700, timeout=0):
            info = await fails_without_waiting(pool.reserve(400, timeout=0))
            assert "300" in str(info.value) and "400" in str(info.value)  # free and needed bytes
            assert pool.bytes_used == 700
        assert pool.bytes_used == 0

    run(main())


def test_waiting_reservation_succeeds_when_another_is_released() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        holder_in, release = asyncio.Event(), asyncio.Event()
        got_it = asyncio.Event()

        async def holder() -> None:
            async with pool.reserve(800, timeout=0):
                holder_in.set()
                await release.wait()

        async def waiter() -> None:
            async with pool.reserve(500, timeout=3600):  # only a release can let it in, not its timeout
                got_it.set()
                assert pool.bytes_used == 500

        holder_task = asyncio.create_task(holder())
        await holder_in.wait()
        waiter_task = asyncio.create_task(waiter())
        for _ in range(20):  # the loop runs the waiter as far as it can go
            await asyncio.sleep(0)
        assert not got_it.is_set() and not waiter_task.done()  # still waiting for room
        release.set()
        await waiter_task
        await holder_task
        assert got_it.is_set()
        assert pool.bytes_used == 0

    run(main())


def test_waiting_reservation_fails_after_timeout() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        async with pool.reserve(800, timeout=0):
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(CacheAllocationError, match="full"):
                async with pool.reserve(500, timeout=0.2):
                    pytest.fail("should not be reached")
            # It waited out its timeout (a lower bound: a slow machine can only make it later).
            assert loop.time() - began >= 0.2 - 2 * time.get_clock_info("monotonic").resolution - 0.005
            assert pool.bytes_used == 800
            # the pool still works after a timed-out waiter
            async with pool.reserve(200, timeout=0):
                assert pool.bytes_left == 0
        assert pool.bytes_used == 0

    run(main())


def test_several_waiters_are_served_as_room_frees() -> None:
    async def main() -> None:
        pool = KVCachePool(100)
        served: list[int] = []

        async def session(i: int, hold: float) -> None:
            async with pool.reserve(60, timeout=3.0):
                assert pool.bytes_used <= pool.capacity_bytes
                served.append(i)
                await asyncio.sleep(hold)

        await asyncio.gather(*(session(i, 0.05) for i in range(4)))
        assert sorted(served) == [0, 1, 2, 3]
        assert pool.bytes_used == 0

    run(main())


def test_bytes_are_returned_after_an_exception_inside() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        with pytest.raises(ZeroDivisionError):
            async with pool.reserve(900, timeout=0):
                1 / 0  # noqa: B018
        assert pool.bytes_used == 0
        async with pool.reserve(1000, timeout=0):
            assert pool.bytes_left == 0

    run(main())


def test_bytes_are_returned_when_the_session_is_cancelled() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        inside = asyncio.Event()

        async def session() -> None:
            async with pool.reserve(900, timeout=0):
                inside.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(session())
        await inside.wait()
        assert pool.bytes_used == 900
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.bytes_used == 0

    run(main())


def test_cancelled_waiter_reserves_nothing() -> None:
    async def main() -> None:
        pool = KVCachePool(1000)
        async with pool.reserve(800, timeout=0):
            waiter = asyncio.create_task(_reserve_and_hold(pool, 500))
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert pool.bytes_used == 800
        assert pool.bytes_used == 0

    run(main())


async def _reserve_and_hold(pool: KVCachePool, nbytes: int) -> None:
    async with pool.reserve(nbytes, timeout=5.0):
        await asyncio.sleep(60)


def test_release_survives_a_second_cancellation() -> None:
    async def main() -> None:
        pool = KVCachePool(100)
        a_in, a_release, c_in = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def session_a() -> None:
            async with pool.reserve(60, timeout=0):
                a_in.set()
                await a_release.wait()

        async def session_b() -> None:  # waits for A's bytes
            async with pool.reserve(60, timeout=5.0):
                await asyncio.sleep(0.01)

        async def session_c() -> None:
            async with pool.reserve(30, timeout=0):
                c_in.set()
                await asyncio.sleep(60)

        task_a = asyncio.create_task(session_a())
        await a_in.wait()
        task_c = asyncio.create_task(session_c())
        await c_in.wait()
        task_b = asyncio.create_task(session_b())
        await asyncio.sleep(0.02)
        a_release.set()
        # wait until B, just woken, holds the pool's lock, then cancel C twice (e.g. client gone, then shutdown)
        for _ in range(100):
            await asyncio.sleep(0)
            if pool._freed.locked():
                break
        task_c.cancel()
        await asyncio.sleep(0)
        task_c.cancel()
        await asyncio.gather(task_a, task_b, task_c, return_exceptions=True)
        assert pool.bytes_used == 0

    run(main())
