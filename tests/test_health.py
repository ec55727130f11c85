"""The heartbeat file: written atomically by the running bot, judged by `i2p2i health`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from i2p2i_bot import app, health
from i2p2i_bot.cli import main
from i2p2i_bot.config import Settings
from i2p2i_bot.gpu import GpuFault
from i2p2i_bot.health import (
    HEALTH_FILE,
    BotStatus,
    Heartbeat,
    HeartbeatError,
    check_health,
    read_heartbeat,
    run_heartbeat,
    write_heartbeat,
)
from i2p2i_bot.jobs import Job
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.store import Store
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord
from tests.fake_engine import FakeEngine
from tests.requests import job_request

NOW = 1_700_000_000.0
GOOD = BotStatus(
    state="ready",
    gateway_connected=True,
    queued_jobs=3,
    running_jobs=1,
    gpu_worker_alive=True,
    runner_alive=True,
)
PARAMS = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm")


def beat(age_s: float = 5.0, **changes: object) -> Heartbeat:
    return Heartbeat(NOW - age_s, NOW - 3600, 4242, dataclasses.replace(GOOD, **changes))  # type: ignore[arg-type]


def write(path: Path, age_s: float = 5.0, **changes: object) -> Path:
    write_heartbeat(path, beat(age_s, **changes))
    return path


# --- the file -------------------------------------------------------------------------------------------


def test_heartbeat_round_trips_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    """A written heartbeat reads back equal, is readable by others, and no temporary file stays behind."""
    path = tmp_path / "nested" / HEALTH_FILE
    write_heartbeat(path, beat())
    write_heartbeat(path, beat(age_s=1.0, queued_jobs=7))
    assert read_heartbeat(path) == beat(age_s=1.0, queued_jobs=7)
    assert sorted(p.name for p in path.parent.iterdir()) == [HEALTH_FILE]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["state"] == "ready" and data["pid"] == 4242
    assert data["written_at_utc"] == "2023-11-14T22:13:19+00:00"


def test_a_failed_write_keeps_the_old_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the new file cannot be put in place, the old heartbeat is intact and the temporary file is gone."""
    path = write(tmp_path / HEALTH_FILE)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(health.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_heartbeat(path, beat(queued_jobs=99))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [HEALTH_FILE]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: "{", "not valid JSON"),
        (lambda d: "[1, 2]", "not a JSON object"),
        (lambda d: {**d, "format": 9}, "unknown format 9"),
        (lambda d: {k: v for k, v in d.items() if k != "runner_alive"}, "the field runner_alive is missing"),
        (lambda d: {**d, "state": "dancing"}, "unknown state 'dancing'"),
        (lambda d: {**d, "queued_jobs": -1}, "queued_jobs must be a whole number"),
        (lambda d: {**d, "gateway_connected": "yes"}, "gateway_connected must be true or false"),
        (lambda d: {**d, "gpu_stuck": 1}, "gpu_stuck must be true or false"),
        (lambda d: {**d, "written_at": "noon"}, "written_at must be a number"),
    ],
)
def test_broken_heartbeat_files_are_reported(tmp_path: Path, mutate: Callable, needle: str) -> None:
    """A file that is not a heartbeat is unhealthy, with one line naming what is wrong."""
    path = write(tmp_path / HEALTH_FILE)
    changed = mutate(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(HeartbeatError, match=needle):
        read_heartbeat(path)
    report = check_health(path, now=NOW)
    assert not report.healthy and needle in report.reason and "is not a heartbeat file" in report.reason


# --- the verdict ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_s", "changes", "needle"),
    [
        (61.0, {}, "the last heartbeat is 61 s old (the limit is 60 s)"),
        (-120.0, {}, "dated 120 s in the future"),
        (1.0, {"state": "starting"}, "still starting"),
        (1.0, {"state": "stopping"}, "stopping"),
        (1.0, {"state": "stopped"}, "the bot stopped at 2023-11-14T22:13:19+00:00"),
        (500.0, {"state": "stopped"}, "the bot stopped at"),
        (1.0, {"gpu_worker_alive": False}, "the GPU worker thread has died"),
        (1.0, {"runner_alive": False}, "the job runner has stopped"),
        (1.0, {"gpu_stuck": True}, "the GPU thread has been on one task for more than twice"),
        (1.0, {"gpu_faulted": True, "runner_alive": False}, "a CUDA error left the GPU unusable"),
        (1.0, {"gateway_connected": False}, "not connected to Discord's gateway"),
        (1.0, {"workers_unreachable": True}, "GPU workers unreachable: Redis cannot be reached"),
    ],
)
def test_unhealthy_heartbeats(tmp_path: Path, age_s: float, changes: dict, needle: str) -> None:
    """Stale, future, starting, stopping, stopped, dead GPU thread, dead runner, no gateway: each says why."""
    report = check_health(write(tmp_path / HEALTH_FILE, age_s, **changes), now=NOW)
    assert not report.healthy
    assert needle in report.reason and "\n" not in report.reason


def test_a_fresh_healthy_heartbeat(tmp_path: Path) -> None:
    """Fresh, ready, connected, GPU thread and runner alive: healthy, with the queue in the line."""
    report = check_health(write(tmp_path / HEALTH_FILE, 59.0, queue_paused=True), now=NOW)
    assert report.healthy
    assert report.reason == (
        "healthy: heartbeat 59 s ago, connected to Discord, 3 queued and 1 running jobs, queue paused"
    )
    assert check_health(tmp_path / HEALTH_FILE, now=NOW, stale_after_s=30).healthy is False


def test_a_missing_heartbeat(tmp_path: Path) -> None:
    report = check_health(tmp_path / HEALTH_FILE, now=NOW)
    assert not report.healthy and report.reason.startswith("no heartbeat file at ")


# --- the command line -----------------------------------------------------------------------------------


def test_health_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 and one line on stdout when fresh and healthy; exit 1 and one line on stderr otherwise."""
    path = tmp_path / HEALTH_FILE
    write_heartbeat(path, Heartbeat(time.time() - 2, 0.0, 1, GOOD))
    assert main(["health", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("healthy: heartbeat ") and out.count("\n") == 1 and err == ""

    cases: list[tuple[Heartbeat | None, str]] = [
        (Heartbeat(time.time() - 600, 0.0, 1, GOOD), "s old (the limit is 60 s)"),
        (None, "no heartbeat file at"),
        (
            Heartbeat(time.time(), 0.0, 1, dataclasses.replace(GOOD, gpu_worker_alive=False)),
            "the GPU worker thread has died",
        ),
    ]
    for heartbeat, needle in cases:
        path.unlink(missing_ok=True)
        if heartbeat is not None:
            write_heartbeat(path, heartbeat)
        assert main(["health", "--file", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("i2p2i: unhealthy: ") and needle in err
        assert err.count("\n") == 1


def test_health_command_finds_the_data_dir_and_honours_max_age(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --file it reads DATA_DIR/health.json (config or I2P2I_DATA_DIR); --max-age moves the limit."""
    data = tmp_path / "data"
    write_heartbeat(data / HEALTH_FILE, Heartbeat(time.time() - 90, 0.0, 1, GOOD))
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{data}"\n')
    assert main(["health", "--config", str(config)]) == 1
    assert "s old" in capsys.readouterr().err
    assert main(["health", "--config", str(config), "--max-age", "300"]) == 0
    monkeypatch.setenv("I2P2I_DATA_DIR", str(data))
    assert main(["health", "--max-age", "300"]) == 0
    assert main(["health", "--max-age", "0"]) == 2
    assert "--max-age must be a positive number" in capsys.readouterr().err


def test_health_exit_code_through_the_process(tmp_path: Path) -> None:
    """`python -m i2p2i_bot health` really exits 1 for a stale heartbeat (what a HEALTHCHECK sees)."""
    path = write(tmp_path / HEALTH_FILE, age_s=0.0)  # written in 2023: long stale
    done = subprocess.run(
        [sys.executable, "-m", "i2p2i_bot", "health", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == "" and "s old" in done.stderr and done.stderr.count("\n") == 1


# --- the writer -----------------------------------------------------------------------------------------


async def test_run_heartbeat_rewrites_and_says_stopped_when_cancelled(tmp_path: Path) -> None:
    """The loop writes the current status each beat; cancelling it leaves a 'stopped' heartbeat."""
    path = tmp_path / HEALTH_FILE
    statuses = iter(range(1_000_000))
    seen: list[int] = []

    def status() -> BotStatus:
        seen.append(next(statuses))
        return dataclasses.replace(GOOD, queued_jobs=seen[-1])

    task = asyncio.create_task(run_heartbeat(path, status, interval_s=0.01))
    await wait_for(lambda: path.exists() and read_heartbeat(path).status.queued_jobs >= 3)
    first = read_heartbeat(path)
    assert first.pid == os.getpid() and first.status.state == "ready"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = read_heartbeat(path)
    assert last.status.state == "stopped" and last.status.queued_jobs == seen[-1]
    assert last.started_at == first.started_at
    assert check_health(path).reason.startswith("the bot stopped at ")


async def test_run_heartbeat_survives_write_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A heartbeat that cannot be written is logged once; the loop goes on and writes again when it can."""
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    path = blocker / HEALTH_FILE
    calls = 0

    def status() -> BotStatus:
        nonlocal calls
        calls += 1
        return GOOD

    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.health"):
        task = asyncio.create_task(run_heartbeat(path, status, interval_s=0.01))
        await wait_for(lambda: calls >= 5)
        assert not task.done()
        blocker.unlink()
        await wait_for(path.exists)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    warnings = [r for r in caplog.records if "cannot write the heartbeat file" in r.getMessage()]
    assert len(warnings) == 1
    assert read_heartbeat(path).status.state == "stopped"


async def wait_for(condition: Callable[[], object], timeout_s: float = 20.0) -> None:
    """Poll a condition on files the bot writes (there is no event to wait on) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"still not true after {timeout_s} s")
        await asyncio.sleep(0.01)


def current_status(path: Path) -> BotStatus:
    return read_heartbeat(path).status


async def read_job(settings: Settings, job_id: int) -> Job:
    store = await Store.from_settings(settings)
    try:
        job = await store.get_job(job_id)
    finally:
        await store.close()
    assert job is not None
    return job


# --- the running bot ------------------------------------------------------------------------------------


async def test_the_running_bot_keeps_a_heartbeat(
    discord_server: FakeDiscord,
    base_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real bot writes health.json: gateway, GPU thread, runner, queue; and 'stopped' after close."""
    monkeypatch.setattr(health, "HEARTBEAT_INTERVAL_S", 0.05)
    data = tmp_path / "data"
    monkeypatch.setenv("I2P2I_DATA_DIR", str(data))  # what `i2p2i health` reads, as in the container
    path = data / HEALTH_FILE
    settings = bot_settings(base_settings, data, discord_server, stop_grace_s=5.0, max_batch_images=1)
    engine = FakeEngine()
    engine.gate.clear()  # the first batch waits on the GPU thread until the test lets it go

    def current() -> Heartbeat:
        return read_heartbeat(path)

    async with running_i2p2i(settings, discord_server, engine) as bot:
        await wait_for(lambda: path.exists() and current().status.gateway_connected)
        ready = current()
        assert ready.pid == os.getpid()
        assert ready.status == BotStatus(
            state="ready",
            gateway_connected=True,
            queued_jobs=0,
            running_jobs=0,
            gpu_worker_alive=True,
            runner_alive=True,
            queue_paused=False,
        )
        assert main(["health"]) == 0
        assert capsys.readouterr().out.startswith("healthy: ")
        # What a closed gateway socket and a dead GPU thread look like (patched only for this one call).
        with monkeypatch.context() as patch:
            patch.setattr(type(bot.ws), "open", property(lambda ws: False))
            patch.setattr(bot.gpu.thread, "is_alive", lambda: False)
            broken = bot.health_status()
        assert (broken.gateway_connected, broken.gpu_worker_alive, broken.runner_alive) == (
            False,
            False,
            True,
        )
        assert bot.health_status().gateway_connected and bot.gpu.thread.is_alive()

        try:
            for owner in (1, 2):
                await bot.queue.submit(job_request(owner, f"prompt {owner}", PARAMS, seed=owner))
            await asyncio.to_thread(engine.entered.wait, 20)
            await wait_for(lambda: (current().status.running_jobs, current().status.queued_jobs) == (1, 1))
            bot.queue.pause()
            await wait_for(lambda: current().status.queue_paused)
            assert main(["health"]) == 0
            assert "1 queued and 1 running jobs, queue paused" in capsys.readouterr().out
            bot.queue.resume()
        finally:
            engine.gate.set()
        await wait_for(lambda: (current().status.running_jobs, current().status.queued_jobs) == (0, 0))
        assert len(engine.batches) == 2

    stopped = current()
    assert stopped.status.state == "stopped" and stopped.started_at == ready.started_at
    assert main(["health"]) == 1
    assert "the bot stopped at" in capsys.readouterr().err
    assert [p.name for p in data.iterdir() if p.name.startswith(f".{HEALTH_FILE}")] == []


def test_a_heartbeat_from_before_gpu_stuck_existed_reads_as_not_stuck(tmp_path: Path) -> None:
    path = write(tmp_path / HEALTH_FILE, 1.0)
    data = json.loads(path.read_text())
    del data["gpu_stuck"], data["gpu_faulted"], data["workers_unreachable"]
    path.write_text(json.dumps(data))
    report = check_health(path, now=NOW)
    assert report.healthy and report.heartbeat is not None
    status = report.heartbeat.status
    assert (status.gpu_stuck, status.gpu_faulted, status.workers_unreachable) == (False, False, False)


async def test_a_lost_gpu_stops_the_bot_with_its_own_exit_code_and_keeps_the_queue(
    discord_server: FakeDiscord,
    base_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA fault on the GPU thread: the heartbeat says so, the bot closes itself with EXIT_GPU_LOST (for
    a service manager to restart it), and the queued job is still queued in the store for that restart."""
    monkeypatch.setattr(health, "HEARTBEAT_INTERVAL_S", 0.05)
    monkeypatch.setattr(app, "GPU_WATCH_INTERVAL_S", 0.05)
    data = tmp_path / "data"
    path = data / HEALTH_FILE
    settings = bot_settings(base_settings, data, discord_server, stop_grace_s=5.0)
    engine = FakeEngine()
    async with running_i2p2i(settings, discord_server, engine) as bot:
        await wait_for(lambda: path.exists() and current_status(path).gateway_connected)
        assert bot.gpu_lost() is None and bot.exit_code == 0
        bot.queue.pause()  # so the job below waits in the queue whatever the GPU thread does
        job = await bot.queue.submit(job_request(1, "a prompt", PARAMS, seed=1))

        def fault() -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        with pytest.raises(GpuFault):
            await bot.gpu.run(fault)
        assert bot.health_status().gpu_faulted
        await wait_for(bot.is_closed)
        assert bot.exit_code == app.EXIT_GPU_LOST
        assert "illegal memory access" in (bot.gpu_lost() or "")
    stored = await read_job(settings, job.id)
    assert stored.status == "queued" and stored.attempts == 0
