"""The built wheel is the product: installed in a fresh virtualenv, away from the checkout, it runs the
bot."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from i2p2i_bot.config import Settings
from tests.discord_fake import FakeDiscord, running_fake_discord
from tests.discord_fake.__main__ import toml_string

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(dest: Path) -> Path:
    """The project's wheel, built by pip as `pip install .` builds it."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest), str(ROOT)]
    setuptools = importlib.metadata.version("setuptools")
    if int(setuptools.split(".")[0]) >= 77:  # what pyproject asks for: build offline with it
        command.insert(4, "--no-build-isolation")
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = dest.glob("i2p2i-*.whl")
    return wheel


def fresh_venv(path: Path, wheel: Path) -> Path:
    """A new virtualenv holding the wheel alone; the libraries it needs come from this one's site-packages,
    added as a plain path (so this checkout's editable install is not among them)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "i2p2i-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, a fresh virtualenv with it installed)."""
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    return wheel, fresh_venv(tmp_path_factory.mktemp("venv") / "venv", wheel)


def test_the_installed_package_is_imported_away_from_the_checkout(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """The fresh virtualenv imports the extensions from the wheel it installed, not from this checkout."""
    _, venv = installed
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import cogs.imagine, i2p2i_bot; print(cogs.imagine.__file__)"],
        cwd=tmp_path, check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)


def test_the_wheel_holds_what_the_bot_loads(installed: tuple[Path, Path]) -> None:
    """The package, its data, the extensions the bot loads by name and both commands are in the wheel."""
    from i2p2i_bot.app import EXTENSIONS

    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    for extension in EXTENSIONS:
        assert extension.replace(".", "/") + ".py" in names, extension
    assert {"i2p2i_bot/migrations/0001_initial.sql", "i2p2i_bot/app.py", "cogs/__init__.py"} <= names
    assert "i2p2i = i2p2i_bot.cli:main" in scripts and "i2p2i-bot = i2p2i_bot.app:main" in scripts
    assert not any(name.startswith(("tests/", "bench/")) for name in names)


async def test_the_installed_bot_starts_and_stops_away_from_the_checkout(
    installed: tuple[Path, Path], base_settings: Settings, tmp_path: Path
) -> None:
    """`i2p2i-bot` from the fresh virtualenv, run outside the checkout, imports the installed package and
    cogs, connects to the loopback Discord, registers every command and stops cleanly on SIGTERM."""
    _, venv = installed
    async with running_fake_discord() as server:
        config = write_config(tmp_path / "bot.toml", base_settings, tmp_path / "data", server)
        env = {**os.environ, "DISCORD_TOKEN": server.token, "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
        env.pop("PYTHONPATH", None)
        process = await asyncio.create_subprocess_exec(
            str(venv / "bin" / "i2p2i-bot"), "--config", str(config),
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            synced = await server.wait_until(lambda: server.synced_commands() or None, timeout_s=240)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 120)
    names = {command["name"] for command in synced}
    assert {"imagine-from", "Imagine from image", "history", "job", "queue", "forget", "admin"} <= names
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    assert "Traceback" not in err.decode(errors="replace")


def write_config(path: Path, settings: Settings, data_dir: Path, server: FakeDiscord) -> Path:
    """The smoke models and short labels of the test settings, talking to `server`."""
    lines = [
        f"data_dir = {toml_string(str(data_dir))}",
        "[models]",
        'preset = "smoke"',
        f"cache_dir = {toml_string(settings.models.cache_dir)}",
        'device = "cpu"',
        "[interrogate]",
        f"labels_dir = {toml_string(settings.interrogate.labels_dir)}",
        "[discord]",
        f"api_base = {toml_string(server.api_base)}",
        f"gateway_url = {toml_string(server.gateway_url)}",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
