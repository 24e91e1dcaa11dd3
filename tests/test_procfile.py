"""The Procfile starts a working server, as on Heroku: run by honcho, bound to $PORT, demo mode.

Also the files the Heroku Python buildpack needs beside pyproject.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.procs import ROOT, START_TIMEOUT_S, free_port

# The app's graceful timeout is 5 s; honcho SIGKILLs what is left 5 s after a process ends.
STOP_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 10.0
LOCK_FILES = ("requirements.txt", "uv.lock", "poetry.lock", "Pipfile.lock")
# Process groups are read from /proc.
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads processes from /proc")
# Variables that would take the app out of demo mode or off its defaults.
APP_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "REDIS_URL", "HOST")


def procfile_commands(procfile: str = "Procfile") -> list[tuple[str, str]]:
    commands = []
    for line in (ROOT / procfile).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, command = line.partition(":")
            assert sep, f"not a Procfile line: {line!r}"
            commands.append((name.strip(), command.strip()))
    return commands


@pytest.mark.parametrize(
    "procfile",
    [
        "Procfile",
        *(f"examples/flask_app/Procfile.{stage}" for stage in ("mount", "port", "ported")),
    ],
)
def test_the_procfile_has_one_web_command_that_binds_port_from_the_environment(
    procfile: str,
) -> None:
    webs = [command for name, command in procfile_commands(procfile) if name == "web"]
    assert len(webs) == 1, procfile_commands(procfile)
    web = webs[0]
    assert web
    # A literal port (`--port 8000`, `-b 0.0.0.0:8000`) would ignore the $PORT Heroku assigns.
    assert not re.search(r"(?:^|[\s:=])\d{2,5}(?=\s|$)", web), web
    if re.search(r"--port|\bbind\b|\s-[pb]\b", web, re.IGNORECASE):
        assert "$PORT" in web or "${PORT" in web, web


def test_the_buildpack_finds_exactly_one_lock_file_and_a_python_version() -> None:
    present = [name for name in LOCK_FILES if (ROOT / name).is_file()]
    assert len(present) == 1, f"exactly one of {LOCK_FILES} must exist, found {present}"
    assert (ROOT / "pyproject.toml").is_file()
    version = (ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.\d+(\.\d+)?", version), version


def _alive_in_group(pgid: int) -> list[int]:
    """Processes (zombies excluded) whose process group is `pgid`."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name is in parentheses and may contain spaces: split after it.
            fields = stat.read_text().rpartition(")")[2].split()
            state, group = fields[0], int(fields[2])
            if group == pgid and state != "Z":
                alive.append(int(stat.parent.name))
    return alive


class Honcho:
    """`honcho start web` in `cwd` (the repo root), in its own process group, output in a log
    file."""

    def __init__(self, log: Path, port: int, procfile: str = "Procfile", cwd: Path = ROOT) -> None:
        self.log, self.port = log, port
        self.procfile, self.cwd = procfile, cwd
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, env_file: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in APP_VARIABLES}
        venv_bin = str(Path(sys.executable).parent)  # where the `chatbot` script is installed
        env |= {
            "PORT": str(self.port),
            "PATH": os.pathsep.join([venv_bin, env.get("PATH", "")]),
            "PYTHONUNBUFFERED": "1",  # honcho's "started (pid=N)" line, before it exits
            "DEMO_WORD_DELAY_S": "0",
        }
        argv = [sys.executable, "-m", "honcho", "--no-colour", "-e", str(env_file)]
        argv += ["-f", self.procfile, "start", "web"]
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """honcho's pid, which is also its process group: it runs in a session of its own."""
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def web_pid(self) -> int:
        """web.1's pid: the `/bin/sh -c` honcho runs the command in, leader of its own process
        group (honcho starts each process in a new session)."""
        found = re.search(r"web\.1 started \(pid=(\d+)\)", self.output())
        assert found, self.output()
        return int(found[1])

    async def wait_healthy(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                pytest.fail(f"honcho exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/healthz", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.05)  # polling with a deadline: there is no event to wait for
        pytest.fail(f"/healthz did not answer within {START_TIMEOUT_S} s:\n{self.output()}")

    async def terminate(self) -> int:
        """SIGTERM honcho's process group, as Heroku does at a dyno restart; its exit code."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            return await self.proc.wait()

    async def kill(self) -> None:
        """Clean-up after a failure: SIGKILL whatever is left of both process groups."""
        if self.proc is None:
            return
        groups = [self.pid]
        with contextlib.suppress(AssertionError):
            groups.append(self.web_pid())
        for group in groups:
            if _alive_in_group(group):  # a group with no member left may be reused: leave it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
        if self.proc.returncode is None:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self.proc.wait()


@pytest.fixture
async def honcho(tmp_path: Path) -> AsyncIterator[Honcho]:
    env_file = tmp_path / "empty.env"  # not a developer's .env, which may configure a model
    env_file.write_text("")
    runner = Honcho(tmp_path / "honcho.log", free_port())
    await runner.start(env_file)
    try:
        yield runner
    finally:
        await runner.kill()


async def _ready_frame(port: int) -> dict[str, Any]:
    """Open a chat socket, read its first frame and close it cleanly."""
    async with asyncio.timeout(CALL_TIMEOUT_S), connect(f"ws://127.0.0.1:{port}/ws") as ws:
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


@linux_only
async def test_honcho_runs_the_web_process_on_port_in_demo_mode(honcho: Honcho) -> None:
    base = f"http://127.0.0.1:{honcho.port}"
    async with httpx.AsyncClient(base_url=base, timeout=CALL_TIMEOUT_S) as client:
        await honcho.wait_healthy(client)
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["demo"] is True
        chat = await client.post("/chat", json={"message": "Are you there?"})
        assert chat.status_code == 200, chat.text
        assert "demo mode" in chat.json()["response"].lower()
        assert "Are you there?" in chat.json()["response"]
    frame = await _ready_frame(honcho.port)
    assert frame["type"] == "ready", frame
    assert frame["demo"] is True

    web_group = honcho.web_pid()
    assert _alive_in_group(web_group), "the web process is not running in its own group"
    code = await honcho.terminate()
    output = honcho.output()
    assert code == 143, output  # honcho's exit code after a SIGTERM
    # web.1's own rc is /bin/sh's: dash does not exec the command, and dies of the SIGTERM.
    assert "SIGKILL" not in output, output  # honcho did not have to force anything
    assert _alive_in_group(honcho.pid) == []
    assert _alive_in_group(web_group) == []


@linux_only
async def test_sigterm_after_a_closed_websocket_stops_promptly_and_cleanly(honcho: Honcho) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{honcho.port}") as client:
        await honcho.wait_healthy(client)
    assert (await _ready_frame(honcho.port))["type"] == "ready"
    started = time.monotonic()
    assert await honcho.terminate() == 143
    elapsed_s = time.monotonic() - started
    output = honcho.output()
    assert _alive_in_group(honcho.web_pid()) == []
    assert elapsed_s < 2.5, f"shutdown took {elapsed_s:.1f} s:\n{output}"
    assert "Traceback" not in output, output
