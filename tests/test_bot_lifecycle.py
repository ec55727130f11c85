"""bot.py as a process: how it starts and stops when Discord is out of reach, or stops by itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.discord_fake import FakeDiscord, running_fake_discord
from tests.discord_fake.__main__ import toml_string

ROOT = Path(__file__).resolve().parents[1]
# What every test here allows a bot.py stop, well inside the 75 s compose and systemd give it.
STOP_S = 5.0


@pytest.fixture
async def server() -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as fake:
        yield fake


def plain(text: str) -> str:
    """`text` without the colour codes discord.py's log handler may add."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def write_config(path: Path, data_dir: Path, api_base: str, gateway_url: str, *extra: str) -> Path:
    lines = [
        f"data_dir = {toml_string(str(data_dir))}",
        "[discord]",
        f"api_base = {toml_string(api_base)}",
        f"gateway_url = {toml_string(gateway_url)}",
        *extra,
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def lifecycle_bot(
    config: Path, log: Path, token: str, *, backoff_s: float | None = None, gpu_lost_when: Path | None = None
) -> subprocess.Popen[bytes]:
    """bot.py with the stand-in engine (tests/lifecycle_bot.py), its output in `log`."""
    command = [sys.executable, "-m", "tests.lifecycle_bot"]
    if backoff_s is not None:
        command += ["--backoff-s", f"{backoff_s:g}"]
    if gpu_lost_when is not None:
        command += ["--gpu-lost-when", str(gpu_lost_when)]
    env = {**os.environ, "DISCORD_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, "--", "--config", str(config)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.mark.timeout(120)
async def test_sigterm_during_the_reconnect_backoff_stops_at_once(
    server: FakeDiscord, tmp_path: Path
) -> None:
    """Connected, then Discord goes away: SIGTERM while discord.py waits to reconnect stops the bot cleanly
    within seconds, not when the wait ends (it grows to ~17 min; compose allows 75 s)."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "bot.toml", data_dir, server.api_base, server.gateway_url)
    log = tmp_path / "bot.log"
    backoff_s = 60.0
    process = lifecycle_bot(config, log, server.token, backoff_s=backoff_s)
    try:

        def connected() -> bool:
            assert process.poll() is None, log.read_text(errors="replace")
            return server.gateway.connected and bool(server.frames(t="GUILD_CREATE", direction="out"))

        await server.wait_until(connected, timeout_s=60, what="bot.py to connect")
        await server.stop()  # the gateway closes, and every new connection is refused
        waiting = f"Attempting a reconnect in {backoff_s:.2f}s"
        await server.wait_until(
            lambda: waiting in log.read_text(errors="replace"), timeout_s=30, what="the reconnect backoff"
        )

        stop_started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bot.py was still running {STOP_S} s after SIGTERM, in a {backoff_s} s backoff")
        stop_s = time.monotonic() - stop_started
        output = plain(log.read_text(errors="replace"))
        assert returncode == 0, output
        assert stop_s < STOP_S
        assert re.search(r"i2p2i\.bot:? stopped$", output, re.MULTILINE), output
        # A clean stop: the last heartbeat says so, and the database was closed (its WAL folded back).
        assert json.loads((data_dir / "health.json").read_text())["state"] == "stopped"
        assert not (data_dir / "i2p2i.sqlite3-wal").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.timeout(120)
async def test_a_lost_gpu_stops_the_process_cleanly_with_exit_code_3(
    server: FakeDiscord, tmp_path: Path
) -> None:
    """The bot's own stop when its GPU is lost ends the process, with exit code 3 and one line, only after
    the same clean close a signal gets: the last heartbeat says stopped and the database is closed."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "bot.toml", data_dir, server.api_base, server.gateway_url)
    log = tmp_path / "bot.log"
    marker = tmp_path / "gpu-lost"
    process = lifecycle_bot(config, log, server.token, gpu_lost_when=marker)
    try:

        def connected() -> bool:
            assert process.poll() is None, log.read_text(errors="replace")
            return server.gateway.connected and bool(server.frames(t="GUILD_CREATE", direction="out"))

        await server.wait_until(connected, timeout_s=60, what="bot.py to connect")
        marker.touch()
        try:
            returncode = process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bot.py was still running {STOP_S} s after its GPU was lost")
        output = plain(log.read_text(errors="replace"))
        assert returncode == 3, output
        assert [line for line in output.splitlines() if line.startswith("bot.py:")] == [
            f"bot.py: stopped because the GPU can do no more work ({marker} exists)"
        ]
        assert re.search(r"i2p2i\.bot:? stopped$", output, re.MULTILINE), output
        assert json.loads((data_dir / "health.json").read_text())["state"] == "stopped"
        assert not (data_dir / "i2p2i.sqlite3-wal").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
