"""The collector policy of `chatbot serve` (chatbot/collector.py), in this process: young
collections only, their survivors frozen, a full collection to free the cycles among them."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator

import pytest
import websockets

from chatbot import collector

CYCLES = 2_000


@pytest.fixture
def policy() -> Iterator[None]:
    collector.install()
    try:
        yield
    finally:
        collector.uninstall()


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_survivors_of_a_young_collection_are_frozen_and_never_scanned_again(policy) -> None:
    kept = [Node() for _ in range(CYCLES)]
    frozen = gc.get_freeze_count()
    gc.collect(0)
    assert gc.get_freeze_count() >= frozen + CYCLES
    assert gc.get_count()[0] < 10 and not gc.get_objects(1) and not gc.get_objects(2)
    del kept  # cycles that became garbage after they were frozen: a middle collection
    assert gc.collect(1) < CYCLES  # cannot see them (it scans only what is not frozen)


def test_a_full_collection_frees_the_cycles_that_died_frozen(policy) -> None:
    kept = [Node() for _ in range(CYCLES)]
    gc.collect(0)
    del kept
    assert collector.full_collection() >= CYCLES
    assert gc.get_freeze_count() > 0  # what is left is frozen again
    assert gc.get_threshold() == collector.THRESHOLDS


async def test_the_young_clock_collects_what_the_allocation_count_misses(policy) -> None:
    """Python counts young allocations minus frees: when frozen objects die as fast as new ones
    are born (sockets closing while others open), the count stays low and the young generation
    grows unscanned, to be scanned in one long pause. The clock collects it anyway."""
    from .support.waiting import wait_until

    frozen = [[] for _ in range(CYCLES * 10)]
    gc.collect(0)  # frozen now
    young = []
    for _ in range(CYCLES * 10):
        young.append([])
        frozen.pop()  # a frozen object freed: the count goes back down
    assert gc.get_count()[0] < collector.YOUNG_THRESHOLD
    assert len(gc.get_objects(0)) >= CYCLES * 10  # born, never scanned, the threshold not met

    async def collected() -> bool:
        return len(gc.get_objects(0)) < CYCLES

    hook = collector.run_collections(young_interval_s=0.01)
    await anext(hook)
    try:
        await wait_until(collected, timeout_s=5)
    finally:
        with pytest.raises(StopAsyncIteration):
            await anext(hook)
    assert len(young) == CYCLES * 10


def test_uninstall_restores_pythons_policy() -> None:
    collector.install()
    collector.uninstall()
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    assert all(callback is not collector._freeze_survivors for callback in gc.callbacks)


CONNECTIONS = 20


async def test_a_closed_connection_leaves_no_reference_cycle_behind() -> None:
    """Hypercorn's server and protocol objects of a closed connection are freed by reference
    counting (chatbot/patches/hypercorn.py), not left to a full collection."""
    from hypercorn.asyncio import serve
    from hypercorn.asyncio.tcp_server import TCPServer

    from chatbot.app import create_app
    from chatbot.cli import hypercorn_config
    from chatbot.patches import hypercorn as hypercorn_fixes
    from chatbot.settings import Settings

    from .support.procs import free_port
    from .support.waiting import wait_until

    settings = Settings(host="127.0.0.1", port=free_port(), demo_word_delay_s=0)
    hypercorn_fixes.install(
        settings.ws_max_message_bytes, deflate=False, close_linger_s=settings.ws_close_linger_s
    )
    app = create_app(settings)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait))
    try:
        url = f"ws://127.0.0.1:{settings.port}/ws"

        async def listening() -> bool:
            try:
                async with websockets.connect(url) as ws:
                    await ws.recv()
                return True
            except OSError:
                return False

        await wait_until(listening, timeout_s=20)
        gc.collect()
        for _ in range(CONNECTIONS):
            async with asyncio.timeout(10), websockets.connect(url) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"

        async def all_closed() -> bool:  # every connection's server ended (or is only garbage)
            return all(
                not s.__dict__ or s.writer.transport.is_closing()
                for s in gc.get_objects()
                if type(s) is TCPServer
            )

        await wait_until(all_closed, timeout_s=20)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = [o for o in gc.garbage if type(o).__module__.startswith("hypercorn.")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []  # without the fix: a TCPServer, its protocols, task group... each
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await server
