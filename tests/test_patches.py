"""The patches into dependencies' internals (chatbot/patches/) still fit the installed versions:
an upgrade that moves what one replaces or relies on fails here by name, and `chatbot serve`
refuses to start, instead of the patch quietly doing nothing or breaking."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import pytest

from chatbot import patches


def test_every_patch_matches_the_installed_dependencies() -> None:
    assert patches.changed_upstream() == []
    patches.verify()


def test_a_changed_upstream_stops_the_server_naming_what_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chatbot.patches import limits

    monkeypatch.setitem(limits.FINGERPRINTS, "limits MemoryStorage", "0" * 16)
    with pytest.raises(patches.UnsupportedUpstream, match="limits MemoryStorage"):
        patches.verify()


def test_chatbot_serve_checks_the_patches_before_it_serves() -> None:
    """`hypercorn_config` (run by `chatbot serve` before it binds) is where the guard runs."""
    code = (
        "from chatbot import cli, patches; from chatbot.settings import Settings\n"
        "from chatbot.patches import redis\n"
        "redis.FINGERPRINTS['redis Connection._connect'] = 'x'\n"
        "try:\n    cli.hypercorn_config(Settings())\n"
        "except patches.UnsupportedUpstream as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "redis Connection._connect" in out.stdout, out.stderr


async def test_the_in_process_sweep_of_expired_keys_runs_once_per_interval() -> None:
    """`limits`' MemoryStorage starts a sweep of every key on every call once the last one has
    ended; ours sweeps once per SWEEP_INTERVAL_S. The hook it replaces is private to `limits`:
    an upgrade that renames it fails here instead of quietly sweeping per message again."""
    from chatbot.patches.limits import paced_memory_storage

    storage = paced_memory_storage()
    await storage.incr("a", 60)
    first = storage.timer
    assert first is not None
    await asyncio.wait_for(first, 5)
    await storage.incr("b", 60)
    assert storage.timer is first  # no second sweep within the interval


def test_the_redis_scripts_that_join_the_batches_still_exist() -> None:
    """`batch_sliding_window_scripts` routes these scripts of `limits`' Redis bridge through
    the broker's batches; if an upgrade renames them, the rate limits would quietly go back to
    a round trip each."""
    from limits.aio.storage import RedisStorage

    from chatbot.patches.limits import BATCHED_SCRIPTS

    storage = RedisStorage("async+redis://127.0.0.1:1", implementation="redispy")
    for name in BATCHED_SCRIPTS:
        script = getattr(storage.bridge, name)
        assert script.sha and script.script  # what the batches run (`EVALSHA`) and reload


def test_the_in_process_storage_calls_its_methods_without_the_error_wrappers() -> None:
    """`limits` wraps each storage method in a coroutine that only re-raises for a storage made
    without `wrap_exceptions`; the in-process one is called without them (36 calls per reply).
    An upgrade that wraps them another way fails here (and the fingerprint of `_wrap_errors`)."""
    from limits.aio.storage import MemoryStorage

    from chatbot.patches.limits import WRAPPED_METHODS, paced_memory_storage

    storage = paced_memory_storage()
    for name in WRAPPED_METHODS:
        wrapped = getattr(MemoryStorage, name)
        assert hasattr(wrapped, "__wrapped__")  # as `limits` wraps them
        assert getattr(storage, name).__func__ is inspect.unwrap(wrapped)
