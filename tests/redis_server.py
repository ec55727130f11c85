"""A real redis-server on a free loopback port, append-only file on, for the scale-out tests and benchmark."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
STUB_ENGINE = "tests.stub_engine:load"


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """redis-server as the README asks for it (appendonly yes, noeviction), restartable on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = redis_server_path()
        assert binary is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--appendonly", "yes", "--maxmemory-policy", "noeviction", "--save", ""]
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start within 5 s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class Workers:
    """`i2p2i worker` processes running the stub engine; each logs the batches it starts to one file."""

    def __init__(
        self,
        server: RedisServer,
        directory: Path,
        *,
        step_s: float,
        lock_s: float = 2.0,
        guides: Sequence[str] = (),
        presets: Sequence[str] | None = None,
        rescan_s: float | None = None,
        generators: Mapping[str, str] | None = None,
    ) -> None:
        """Workers whose data folder is `directory`/data (not the bot's), offering `guides`, having the
        weights of `presets` (None: all the stub's) and the LoRA files put in `lora_dir`, looking again
        at what they can make every `rescan_s` (None: the default); their config gives the presets named
        in `generators` those generators."""
        self.server = server
        self.directory = directory
        self.step_s = step_s
        self.guides = guides
        self.presets = presets
        self.data = directory / "data"
        self.lora_dir = directory / "loras"
        self.log = directory / "batches.jsonl"
        self.config = directory / "worker.toml"
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        rescan = "" if rescan_s is None else f"worker_rescan_s = {rescan_s}\n"
        entries = "".join(
            f'[[models.presets]]\nname = "{name}"\ngenerator = "{generator}"\n'
            for name, generator in (generators or {}).items()
        )
        self.config.write_text(
            f'data_dir = "{self.data}"\n[queue]\nworker_lock_s = {lock_s}\nstop_grace_s = 2.0\n{rescan}'
            f'[models]\nlora_dir = "{self.lora_dir}"\n{entries}',
            encoding="utf-8",
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        # A test that forgets stop() must not leave workers dialling a Redis that is gone, past the run.
        atexit.register(self.stop)

    def spawn(self, n: int = 1) -> list[subprocess.Popen[bytes]]:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "I2P2I_TEST_ENGINE": STUB_ENGINE,
            "I2P2I_STUB_STEP_S": str(self.step_s),
            "I2P2I_STUB_LOG": str(self.log),
            "I2P2I_STUB_GUIDES": ",".join(self.guides),
        }
        if self.presets is not None:
            env["I2P2I_STUB_PRESETS"] = ",".join(self.presets)
        env.pop("I2P2I_REDIS_URL", None)
        started = []
        for _ in range(n):
            index = len(self.processes)
            with (self.directory / f"worker-{index}.log").open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "i2p2i_bot", "worker", *self.args()],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.processes.append(process)
            started.append(process)
        return started

    def args(self) -> Sequence[str]:
        return ["--config", str(self.config), "--redis", self.server.url]

    def output(self, process: subprocess.Popen[bytes]) -> str:
        index = self.processes.index(process)
        return (self.directory / f"worker-{index}.log").read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait(timeout=10)
