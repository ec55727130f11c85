"""How the bot starts and stops when Discord is out of reach, or stops by itself.

bot.py runs as a process where its signals, output and exit code are the point; the rest runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from i2p2i_bot import app
from i2p2i_bot.config import Settings
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord
from tests.discord_fake.__main__ import toml_string
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[1]
# What every test here allows a bot.py stop, well inside the 75 s compose and systemd give it.
STOP_S = 5.0
LOGIN = "GET /users/@me"


@pytest.fixture
def quick_start_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tries at start 50 ms apart, not 1 s, then 2 s, …"""
    monkeypatch.setattr(app, "START_RETRY_FIRST_DELAY_S", 0.05)


def settings_for(
    base_settings: Settings, tmp_path: Path, server: FakeDiscord, start_retry_s: float
) -> Settings:
    settings = bot_settings(base_settings, tmp_path / "data", server)
    return dataclasses.replace(
        settings, discord=dataclasses.replace(settings.discord, start_retry_s=start_retry_s)
    )


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A local port that refuses connections: bound, so nothing else takes it, and not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


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
    config: Path,
    log: Path,
    token: str,
    *,
    backoff_s: float | None = None,
    gpu_lost_when: Path | None = None,
    load_s: float = 0.0,
    describe_hangs: bool = False,
) -> subprocess.Popen[bytes]:
    """bot.py with the stand-in engine (tests/lifecycle_bot.py), its output in `log`."""
    command = [sys.executable, "-m", "tests.lifecycle_bot", "--load-s", f"{load_s:g}"]
    if backoff_s is not None:
        command += ["--backoff-s", f"{backoff_s:g}"]
    if gpu_lost_when is not None:
        command += ["--gpu-lost-when", str(gpu_lost_when)]
    if describe_hangs:
        command.append("--describe-hangs")
    env = {**os.environ, "DISCORD_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, "--", "--config", str(config)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.mark.timeout(120)
async def test_discord_unreachable_at_start_exits_with_one_line_and_code_4(tmp_path: Path) -> None:
    """bot.py that cannot reach Discord at all stops with exit code 4 and one line saying what to check,
    without a traceback and before loading any model."""
    with refused_port() as port:
        config = write_config(
            tmp_path / "bot.toml",
            tmp_path / "data",
            f"http://127.0.0.1:{port}/api/v10",
            f"ws://127.0.0.1:{port}/",
            "start_retry_s = 0",
        )
        env = {**os.environ, "DISCORD_TOKEN": "any-token", "HF_HUB_OFFLINE": "1"}
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bot.py"), "--config", str(config),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        _, err_bytes = await asyncio.wait_for(process.communicate(), 60)
    elapsed_s = time.monotonic() - started
    err = plain(err_bytes.decode(errors="replace"))
    assert process.returncode == app.EXIT_DISCORD_UNREACHABLE, err
    lines = [line for line in err.splitlines() if line.startswith("bot.py:")]
    assert lines == [
        f"bot.py: Discord could not be reached (Cannot connect to host 127.0.0.1:{port} ssl:default "
        f"[Connect call failed ('127.0.0.1', {port})]); check this machine's network and DNS, "
        "https://discordstatus.com, and discord.api_base if you set it"
    ], err
    assert "Traceback" not in err
    assert "loading models" not in err
    assert elapsed_s < 30  # Python's start and imports; the failure itself is immediate


async def test_start_tries_again_until_discord_answers(
    server: FakeDiscord,
    base_settings: Settings,
    tmp_path: Path,
    quick_start_retries: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage at start is ridden out: after two failed tries the bot logs in, sets up once and
    connects, with one warning a failed try."""
    server.fail_next(LOGIN, status=503, times=2)
    settings = settings_for(base_settings, tmp_path, server, start_retry_s=30)
    with caplog.at_level(logging.WARNING, logger="i2p2i.bot"):
        async with running_i2p2i(settings, server, FakeEngine()) as bot:
            assert bot.is_ready()
    assert [call.status for call in server.calls(LOGIN)] == [503, 503, 200]
    tried_again = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(tried_again) == 2
    assert all("(it answered HTTP 503)" in message for message in tried_again)
    assert len(server.calls("PUT /applications/{app}/commands")) == 1


async def test_start_gives_up_after_start_retry_s(
    server: FakeDiscord,
    base_settings: Settings,
    tmp_path: Path,
    quick_start_retries: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Discord out of reach for all of start_retry_s: DiscordUnreachable says how long and why, and every
    try's HTTP session was closed (nothing left for asyncio to complain about)."""
    server.fail_next(LOGIN, status=503, times=10_000)
    settings = settings_for(base_settings, tmp_path, server, start_retry_s=0.5)
    with pytest.raises(app.DiscordUnreachable) as raised:
        async with running_i2p2i(settings, server, FakeEngine()):
            pass
    tries = len(server.calls(LOGIN))
    assert tries >= 3 and raised.value.tries == tries
    assert 0.5 <= raised.value.elapsed_s < 5
    assert str(raised.value).startswith(f"Discord could not be reached after {tries} tries in ")
    assert "(it answered HTTP 503)" in str(raised.value)
    gc.collect()
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]


async def test_close_while_waiting_to_try_again_ends_the_start_at_once(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path
) -> None:
    """SIGTERM's close() during the pause between tries at start: start() returns at once, having set
    nothing up."""
    server.fail_next(LOGIN, status=503, times=10_000)
    settings = settings_for(base_settings, tmp_path, server, start_retry_s=600)
    bot = app.create_bot(settings, engine_loader=lambda _settings: FakeEngine())
    with server.patch_discord():
        async with bot:
            start = asyncio.create_task(bot.start(server.token))
            await server.wait_for(route=LOGIN, timeout_s=10)
            await asyncio.sleep(0.1)  # into the pause of a second before the next try
            assert not start.done()
            closed_at = time.monotonic()
            await bot.close()
            await asyncio.wait_for(start, 2)
            assert time.monotonic() - closed_at < 1
    assert len(server.calls(LOGIN)) == 1
    assert not hasattr(bot, "store")


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


@pytest.mark.timeout(120)
async def test_sigterm_while_the_models_load_stops_cleanly(server: FakeDiscord, tmp_path: Path) -> None:
    """A stop during the model load (minutes with real weights) ends bot.py with exit code 0 and no
    traceback once the load returns, without setting up anything after it."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "bot.toml", data_dir, server.api_base, server.gateway_url)
    log = tmp_path / "bot.log"
    load_s = 3.0
    process = lifecycle_bot(config, log, server.token, load_s=load_s)
    try:
        await server.wait_until(
            lambda: "stand-in engine: loading" in log.read_text(errors="replace"),
            timeout_s=60,
            what="the models to start loading",
        )
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(load_s + STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail("bot.py was still running after its load and the stop's allowance")
        output = plain(log.read_text(errors="replace"))
        assert returncode == 0, output
        assert "Traceback" not in output and "stopped while the models loaded; nothing was started" in output
        assert server.synced_commands() == []  # nothing after the load ran
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
