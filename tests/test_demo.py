"""The developer demo, end to end: `python -m tests.discord_fake serve` and the real bot.py, two processes."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from i2p2i_bot.smoke import SmokeModels

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 30.0
DEMO_S = 110.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def section(output: str, start: str, stop: str) -> str:
    """The lines of ``output`` from the one starting with ``start`` up to the next starting with ``stop``."""
    found = output[output.index(start) :]
    end = found.find("\n" + stop, len(start))
    return found if end < 0 else found[:end]


class Processes:
    """Subprocesses with their output in files; every one is killed at teardown, whatever happened."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own copy
        self.running[name] = process
        return process

    def output(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.output(name)[-6000:]}" for name in self.running)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5
        for process in self.running.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


def wait_for_line(processes: Processes, name: str, needle: str, timeout_s: float) -> str:
    """The first line of ``name``'s output containing ``needle``; fails if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in processes.output(name).splitlines():
            if needle in line:
                return line
        if processes.running[name].poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{name} printed no line with {needle!r}\n{processes.logs()}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_serves_imagine_from_to_the_real_bot(
    processes: Processes, tmp_path: Path, smoke_cache: Path, smoke_models: SmokeModels, labels_dir: Path
) -> None:
    """The demo's printed command starts bot.py, which answers /imagine-from and delivers two 512px images."""
    port = free_port()
    config = tmp_path / "dev-discord.toml"
    out = tmp_path / "demo-out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("DISCORD_TOKEN", None)
    started = time.monotonic()
    serve = processes.start(
        "serve",
        [
            sys.executable,
            "-m",
            "tests.discord_fake",
            "serve",
            "--port",
            str(port),
            "--exit-when-done",
            "--config-out",
            str(config),
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
            "--cache-dir",
            str(smoke_cache),
            "--labels-dir",
            str(labels_dir),
            "--connect-timeout",
            "90",
            "--timeout",
            "90",
        ],
        env,
    )

    # Start the bot exactly as the demo tells the developer to.
    line = wait_for_line(processes, "serve", "bot.py --config", STARTUP_S)
    assignment, python, script, flag, config_arg = shlex.split(line)
    name, token = assignment.split("=", 1)
    assert name == "DISCORD_TOKEN" and token
    assert flag == "--config" and (REPO_ROOT / config_arg).resolve() == config.resolve()
    assert (REPO_ROOT / script).resolve() == (REPO_ROOT / "bot.py").resolve()
    written = tomllib.loads(config.read_text(encoding="utf-8"))
    assert written["models"]["preset"] == "smoke"
    assert written["discord"] == {
        "api_base": f"http://127.0.0.1:{port}/api/v10",
        "gateway_url": f"ws://127.0.0.1:{port}/gateway",
    }
    assert written["data_dir"] == str(tmp_path / "data")
    bot_env = {**env, "DISCORD_TOKEN": token, "I2P2I_CACHE_DIR": str(smoke_cache)}
    bot = processes.start("bot", [python, script, "--config", config_arg], bot_env)

    deadline = started + DEMO_S
    while serve.poll() is None and time.monotonic() < deadline:
        assert bot.poll() is None, f"bot.py exited with {bot.returncode} first\n{processes.logs()}"
        time.sleep(0.2)
    assert serve.poll() == 0, f"serve ended with {serve.poll()} (None: still running)\n{processes.logs()}"
    took = time.monotonic() - started

    # The bot's log is a file: it says what the start is doing with the labels (embedding them, or loading
    # the table an earlier test of this session cached), and holds no progress bar redrawn with carriage
    # returns.
    bot_log = (tmp_path / "bot.log").read_bytes()  # as written: reading text would turn "\r" into "\n"
    assert b"\r" not in bot_log and b"%|" not in bot_log, bot_log[-3000:]
    built = b"building the label table: embedding " in bot_log and b"label table built: " in bot_log
    assert built or b"label table loaded from " in bot_log, bot_log[-3000:]

    output = processes.output("serve")
    assert f"Fake Discord listening on http://127.0.0.1:{port}" in output
    connected = next(ln for ln in output.splitlines() if ln.startswith("The bot connected as i2p2i-test"))
    assert "synced 10 commands" in connected and "imagine-from" in connected
    assert "alice uploads astronaut.png (512×512, " in output
    assert "/imagine-from image:astronaut.png count:2 in #general" in output

    card = section(output, "Prompt card after", "alice presses Generate")
    assert "  title: Prompt · best" in card
    card_prompt = section(card, "  prompt:", "  CLIP score:").splitlines()[1].strip()
    assert len(card_prompt) > 10
    assert "[Generate" in card and "Edit prompt]" in card

    progress = section(output, "alice presses Generate", "Result after")
    states = [ln.split("] ", 1)[1] for ln in progress.splitlines()[1:] if ln.startswith("  [")]
    assert states[-1] == "@alice job #1 is done."
    assert any(re.fullmatch(r"🎨 Job #1: making 2 images · step \d+/25…", s) for s in states), states

    result = section(output, "Result after", "Done (--exit-when-done).")
    assert "  title: Job #1" in result
    assert section(result, "  prompt:", "  Images").splitlines()[1].strip() == card_prompt
    seeds = dict(re.findall(r"#(\d) seed `(\d+)` · fidelity -?\d\.\d{3}", result))
    assert sorted(seeds) == ["1", "2"] and seeds["1"] != seeds["2"], result
    assert "  footer: 512×512 · 25 steps · guidance 7.5 · dpm" in result
    assert "[🎲 Reroll]" in result and "[🗑️ Delete]" in result

    files = sorted(path.name for path in out.iterdir())
    singles = {f"job1-{k}-seed{seed}.png" for k, seed in seeds.items()}
    assert set(files) == {"job1-grid.png"} | singles, files
    for filename in files:
        path = out / filename
        with Image.open(path) as image:
            assert image.format == "PNG"
            size = image.size
            image.load()  # every pixel decodes: the file is whole
        assert size == ((1024, 512) if filename == "job1-grid.png" else (512, 512))
        assert f"{path}  ({size[0]}×{size[1]} px, " in result
    assert took < DEMO_S
