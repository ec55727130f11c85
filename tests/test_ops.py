"""Operations: online backups, the README's configuration reference, the Dockerfile, compose.yaml and the
container's entry point."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from i2p2i_bot.backup import BackupError, backup_database
from i2p2i_bot.cli import main
from i2p2i_bot.config import QueueSettings, Settings
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.store import Store, packaged_migrations
from tests.requests import job_request

ROOT = Path(__file__).resolve().parent.parent
PARAMS = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm")


# --- backups --------------------------------------------------------------------------------------------


@pytest.fixture
def data_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config whose data_dir is a fresh folder; returns (config file, database path)."""
    data = tmp_path / "data"
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{data}"\n')
    return config, data / "i2p2i.sqlite3"


def prompts(path: Path) -> dict[int, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, prompt FROM jobs ORDER BY id").fetchall())


async def test_backup_while_the_bot_store_is_open_with_open_transactions(
    data_config: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the store open in WAL mode and another writer mid-transaction, the copy has exactly what was
    committed, passes integrity_check, stands alone, and neither writer is disturbed."""
    config, db_path = data_config
    store = await Store.open(db_path, images_dir=db_path.parent / "images")
    try:
        for n in (1, 2, 3):
            await store.insert_job(job_request(n, f"prompt {n}", PARAMS, seed=n))
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("UPDATE jobs SET prompt = 'committed elsewhere' WHERE id = 2")
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE jobs SET prompt = 'not committed' WHERE id = 1")
        other.execute("DELETE FROM jobs WHERE id = 3")
        dest = tmp_path / "backups" / "copy.sqlite3"
        dest.parent.mkdir()

        code = await asyncio.to_thread(main, ["--config", str(config), "backup", str(dest)])

        assert code == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        assert f"→ {dest} (" in out and f"schema version {len(packaged_migrations())}, integrity ok" in out
        assert prompts(dest) == {1: "prompt 1", 2: "committed elsewhere", 3: "prompt 3"}
        with sqlite3.connect(dest) as copy:
            assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.sqlite3"]

        other.execute("COMMIT")
        other.close()
        job = await store.insert_job(job_request(4, "after the backup", PARAMS, seed=4))
        assert prompts(db_path) == {1: "not committed", 2: "committed elsewhere", job.id: "after the backup"}
        assert job.id not in prompts(dest)
    finally:
        await store.close()


def test_every_copy_is_one_consistent_snapshot_under_concurrent_writes(tmp_path: Path) -> None:
    """While a writer moves money between two accounts in transactions, every copy balances: no copy holds
    half of a transaction."""
    source = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(source, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE account (name TEXT PRIMARY KEY, balance INTEGER)")
        db.execute("CREATE TABLE moves (id INTEGER PRIMARY KEY, amount INTEGER)")
        db.execute("INSERT INTO account VALUES ('a', 100000), ('b', 0)")
    stop = threading.Event()
    started = threading.Event()
    moved = 0

    def writer() -> None:
        nonlocal moved
        db = sqlite3.connect(source, isolation_level=None, timeout=30)
        while not stop.is_set():
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE account SET balance = balance - 1 WHERE name = 'a'")
            db.execute("INSERT INTO moves (amount) VALUES (1)")
            db.execute("UPDATE account SET balance = balance + 1 WHERE name = 'b'")
            db.execute("COMMIT")
            moved += 1
            started.set()
        db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    copies = []
    try:
        assert started.wait(30)
        for k in range(6):
            copies.append(backup_database(source, tmp_path / f"copy-{k}.sqlite3").dest)
    finally:
        stop.set()
        thread.join()
    assert moved > 0
    for copy in copies:
        with sqlite3.connect(copy) as db:
            balances = dict(db.execute("SELECT name, balance FROM account").fetchall())
            (moves,) = db.execute("SELECT count(*) FROM moves").fetchone()
        assert balances["a"] + balances["b"] == 100000
        assert balances["b"] == moves


def test_backup_into_a_folder_names_a_dated_copy(tmp_path: Path) -> None:
    """DEST that is a folder gets SOURCE-YYYYMMDD-HHMMSS.sqlite3 in it; a missing folder is refused."""
    source = tmp_path / "i2p2i.sqlite3"
    with sqlite3.connect(source) as db:
        db.execute("CREATE TABLE t (x)")
    folder = tmp_path / "backups"
    folder.mkdir()
    result = backup_database(source, folder, now=1_700_000_000)
    assert result.dest == folder / "i2p2i-20231114-221320.sqlite3"
    assert result.size_bytes == result.dest.stat().st_size > 0
    with pytest.raises(BackupError, match="already exists"):
        backup_database(source, folder, now=1_700_000_000)
    with pytest.raises(BackupError, match=r"the folder .*missing does not exist"):
        backup_database(source, f"{tmp_path / 'missing'}/")
    with pytest.raises(BackupError, match=r"the folder .*nowhere does not exist"):
        backup_database(source, tmp_path / "nowhere" / "copy.sqlite3")


def test_backup_failures_are_one_line_and_leave_nothing(
    data_config: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No database, an existing destination, a file that is not a database, a damaged database: exit 1,
    one line, and no file (finished or partial) at the destination."""
    config, db_path = data_config
    out = tmp_path / "out"
    out.mkdir()

    def run(dest: Path) -> str:
        assert main(["--config", str(config), "backup", str(dest)]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        return captured.err

    assert "there is no database at" in run(out / "a.sqlite3")
    assert not db_path.exists()  # the backup must not create an empty database

    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not a database at all" * 200)
    assert "file is not a database" in run(out / "b.sqlite3")

    with sqlite3.connect(db_path.with_name("good.sqlite3")) as db:
        db.execute("CREATE TABLE t (x)")
    existing = out / "existing.sqlite3"
    existing.write_text("keep me")
    db_path.unlink()
    db_path.with_name("good.sqlite3").rename(db_path)
    assert "already exists" in run(existing)
    assert existing.read_text() == "keep me"

    damage_an_index(db_path)
    err = run(out / "c.sqlite3")
    assert "failed its integrity check" in err and "missing from index" in err
    assert sorted(p.name for p in out.iterdir()) == ["existing.sqlite3"]


def damage_an_index(path: Path) -> None:
    """Rewrite one key inside an index page, so the index no longer matches its table."""
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT)")
        db.execute("CREATE INDEX t_x ON t (x)")
        db.executemany("INSERT INTO t (x) VALUES (?)", [(f"value-{i:05d}",) for i in range(200)])
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 't_x'").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    data = bytearray(path.read_bytes())
    page = slice((root - 1) * page_size, root * page_size)
    at = data[page].index(b"value-00100")
    data[page.start + at : page.start + at + 11] = b"value-99999"
    path.write_bytes(bytes(data))


async def test_a_restored_copy_is_what_the_bot_opens(tmp_path: Path) -> None:
    """The README's restore steps: move the database and its WAL aside, copy the backup in, open the store."""
    db_path = tmp_path / "data" / "i2p2i.sqlite3"
    store = await Store.open(db_path, images_dir=tmp_path / "data" / "images")
    await store.insert_job(job_request(7, "kept", PARAMS, seed=1))
    copy = backup_database(db_path, tmp_path / "copy.sqlite3").dest
    await store.insert_job(job_request(7, "after the backup", PARAMS, seed=2))
    await store.close()

    old = tmp_path / "old"
    old.mkdir()
    for path in db_path.parent.glob("i2p2i.sqlite3*"):
        path.rename(old / path.name)
    shutil.copyfile(copy, db_path)
    store = await Store.open(db_path, images_dir=tmp_path / "data" / "images")
    try:
        assert await store.schema_version() == len(packaged_migrations())
        job = await store.get_job(1)
        assert job is not None and job.request.prompt == "kept"
        assert await store.get_job(2) is None
    finally:
        await store.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# --- the README -----------------------------------------------------------------------------------------


def _fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every setting with its default, as `section.name`."""
    found: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= _fields(hints[f.name], f"{f.name}.")
        else:
            found[prefix + f.name] = getattr(defaults, f.name)
    return found


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,3}} )", text, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(2)


def test_readme_reference_lists_exactly_the_settings_with_their_defaults() -> None:
    """The README's configuration reference has one row per setting the config module defines, no more,
    and each default cell is the setting's real default."""
    rows = re.findall(
        r"^\| `([a-z_.]+)` \| (.+?) \| (.+?) \|$", readme_section("Configuration reference"), re.M
    )
    documented = [key for key, _, _ in rows]
    expected = _fields(Settings)
    assert len(documented) == len(set(documented)), "a setting is listed twice"
    assert set(documented) == set(expected)
    for key, default, meaning in rows:
        assert meaning.strip()
        if key == "discord.token":
            assert "DISCORD_TOKEN" in default
            continue
        literal = re.fullmatch(r"`(.+)`", default)
        assert literal, f"{key}: the default must be a TOML value in backticks, got {default!r}"
        assert tomllib.loads(f"v = {literal.group(1)}")["v"] == expected[key], key


def test_readme_keeps_its_two_commands_and_documents_operations() -> None:
    """`DISCORD_TOKEN=... make run` and `make test` stay; health, backup, restore and upgrades are covered."""
    commands = readme_section("The two commands")
    assert "DISCORD_TOKEN=... make run" in commands and "\nmake test " in commands
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    for title in ("Quick start", "Running without a GPU", "Health checks", "Backing up the database"):
        readme_section(title)
    upgrading = readme_section("Upgrading")
    assert "i2p2i_bot/migrations/" in upgrading and "i2p2i backup" in upgrading
    assert (ROOT / "i2p2i_bot" / "migrations").is_dir()


def _make(tmp_path: Path, path: Path, *args: str, dry_run: bool = True) -> subprocess.CompletedProcess[str]:
    """make's virtualenv target, in a scratch folder, with only `path` on PATH."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    argv = [make, *(["-n"] if dry_run else []), f"VENV={venv}", *args, f"{venv}/.installed"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"PATH": str(path)}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_make_takes_the_first_python_that_is_new_enough(tmp_path: Path) -> None:
    """On a machine without python3.11 whose python3 is older, `make` builds the virtualenv with the first
    Python 3.11 or newer on PATH; PYTHON=... still chooses one; with none, one line says what to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")  # stands for a Python 3.10
    (bin_dir / "python3").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)  # this Python: 3.11 or newer

    planned = _make(tmp_path, bin_dir)
    assert planned.returncode == 0, planned.stderr
    assert f"python -m venv {tmp_path / 'venv'}" in planned.stdout.splitlines()

    chosen = _make(tmp_path, bin_dir, "PYTHON=/opt/python3.13/bin/python3")
    assert f"/opt/python3.13/bin/python3 -m venv {tmp_path / 'venv'}" in chosen.stdout.splitlines()

    (bin_dir / "python").unlink()
    missing = _make(tmp_path, bin_dir, dry_run=False)
    assert missing.returncode != 0 and not (tmp_path / "venv").exists()
    assert missing.stderr.startswith("make: no Python 3.11 or newer on PATH (looked for python3.11 ")
    assert "make PYTHON=/path/to/python3.12" in missing.stderr


def test_package_metadata_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """The license is an SPDX expression (setuptools stops accepting the table form in February 2027), and
    the build system asks for a setuptools that understands it."""
    pytest.importorskip("setuptools", minversion="77")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]
    script = (
        "from setuptools import build_meta\n"
        f"print(build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Deprecat" not in done.stderr, done.stderr[-3000:]
    metadata = (tmp_path / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()


def test_readme_docker_restore_leaves_the_database_to_the_bot_user(tmp_path: Path) -> None:
    """`docker compose cp` creates root's files, so the recipe puts the copy in place as root and gives it
    to the image's user; run here (in a folder standing for /data), it moves the old database with its WAL
    aside and works when there is none."""
    block = re.search(
        r"```sh\n(docker compose stop bot\n.*?)```", readme_section("Backing up the database"), re.S
    )
    assert block, "the README has no Docker restore recipe"
    recipe = block.group(1)
    script = re.search(r"--user root --entrypoint sh bot -c '(.*?)'\n", recipe, re.S)
    assert script, recipe
    user = re.search(r"useradd [^&]* (\w+)\s*&&", (ROOT / "Dockerfile").read_text().replace("\\\n", " "))
    assert user and f"chown {user.group(1)}:{user.group(1)} " in script.group(1)
    me = f"{os.getuid()}:{os.getgid()}"
    body = script.group(1).replace("cd /data", 'cd "$DATA"').replace(f"{user.group(1)}:{user.group(1)}", me)
    for existing in (["i2p2i.sqlite3", "i2p2i.sqlite3-wal", "i2p2i.sqlite3-shm"], []):
        data = tmp_path / f"data-{len(existing)}"
        data.mkdir()
        for name in existing:
            (data / name).write_text("old")
        (data / "restore.sqlite3").write_text("backup")
        subprocess.run(["sh", "-c", body], env={"PATH": "/usr/bin:/bin", "DATA": str(data)}, check=True)
        assert (data / "i2p2i.sqlite3").read_text() == "backup" and not (data / "restore.sqlite3").exists()
        assert sorted(p.name for p in (data / "old").iterdir()) == sorted(existing)


# --- the Dockerfile -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The arguments as a list: JSON exec form, or shell form split into words."""
        try:
            value = json.loads(self.args)
        except ValueError:
            return shlex.split(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage; the first group holds what comes before the first FROM."""
    stages: list[list[Instruction]] = [[]]
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped, as Docker does
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1].rstrip() + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        instruction = Instruction(keyword.upper(), flags, rest, start)
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
        logical = ""
    assert not logical, "the Dockerfile ends inside a continued line"
    return stages


@pytest.fixture(scope="module")
def dockerfile() -> list[list[Instruction]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def global_args(stages: list[list[Instruction]]) -> dict[str, str]:
    found = {}
    for instruction in stages[0]:
        assert instruction.keyword == "ARG", "only ARG may come before the first FROM"
        name, _, value = instruction.args.partition("=")
        found[name] = value
    return found


def test_parser_reads_continuations_flags_and_stages() -> None:
    """The small Dockerfile parser the other tests rely on."""
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG BASE=x:1\nFROM ${BASE} AS one\nRUN a \\\n"
        "    # a comment inside\n    && b\nFROM x:2\nCOPY --chmod=755 --from=one /a /b\n"
    )
    assert [[i.keyword for i in stage] for stage in stages] == [["ARG"], ["FROM", "RUN"], ["FROM", "COPY"]]
    assert stages[1][1].args == "a && b" and stages[1][1].line == 4
    assert stages[2][1].flags == {"chmod": "755", "from": "one"} and stages[2][1].args == "/a /b"


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_final_stage_runs_as_a_user_that_is_not_root(dockerfile: list[list[Instruction]]) -> None:
    """A numeric USER other than root comes before ENTRYPOINT and CMD, no later USER switches back, and a
    RUN creates that user and group."""
    final = dockerfile[-1]
    args = {}
    for instruction in (i for i in final if i.keyword == "ARG"):
        name, _, value = instruction.args.partition("=")
        args[name] = value
    users = [(index, resolve(i.args, args)) for index, i in enumerate(final) if i.keyword == "USER"]
    assert users, "the final stage has no USER"
    for _, user in users:
        uid, _, gid = user.partition(":")
        # Numeric, so Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
        assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    starts = [index for index, i in enumerate(final) if i.keyword in ("ENTRYPOINT", "CMD")]
    assert starts and all(users[0][0] < index for index in starts)
    uid, _, gid = users[0][1].partition(":")
    creates = resolve(" ".join(i.args for i in final if i.keyword == "RUN"), args)
    assert re.search(rf'groupadd [^&]*--gid "{gid}"', creates)
    assert re.search(rf'useradd [^&]*--uid "{uid}"', creates)


def test_final_stage_is_a_cuda_image_with_python_3_11(dockerfile: list[list[Instruction]]) -> None:
    """The image starts from an nvidia/cuda Ubuntu 22.04 tag and its virtualenv has Python 3.11."""
    resolved = resolve(dockerfile[-1][0].args, global_args(dockerfile))
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu22\.04", resolved), resolved
    build_runs = " ".join(i.args for stage in dockerfile for i in stage if i.keyword == "RUN")
    assert "uv python install 3.11" in build_runs and "uv venv --python 3.11 /opt/venv" in build_runs
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_data_volume_environment_and_healthcheck(dockerfile: list[list[Instruction]]) -> None:
    """/data is a VOLUME holding the database and the model caches; the HEALTHCHECK runs `i2p2i health`."""
    final = dockerfile[-1]
    volumes = [v for i in final if i.keyword == "VOLUME" for v in i.exec_form()]
    assert volumes == ["/data"]
    env: dict[str, str] = {}
    for instruction in (i for i in final if i.keyword == "ENV"):
        for word in shlex.split(instruction.args):
            name, _, value = word.partition("=")
            env[name] = value
    assert env["I2P2I_DATA_DIR"] == "/data"
    assert env["HF_HOME"].startswith("/data/") and env["XDG_CACHE_HOME"].startswith("/data/")
    # torch.compile's kernels too, so a restart does not compile the UNet from scratch again.
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/data/cache/")
    assert env["TRITON_CACHE_DIR"].startswith("/data/cache/")
    assert env["PATH"].startswith("/opt/venv/bin:")
    (check,) = [i for i in final if i.keyword == "HEALTHCHECK"]
    mode, _, command = check.args.partition(" ")
    assert mode == "CMD"
    assert json.loads(command)[:2] == ["i2p2i", "health"]
    assert duration_s(check.flags["interval"]) <= 60 and int(check.flags["retries"]) >= 1
    # The first start fetches ~9 GB: 24 minutes at 50 Mbit/s, before the bot can report healthy.
    assert duration_s(check.flags["start-period"]) >= 30 * 60
    stop = [i.args for i in final if i.keyword == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])


def test_final_stage_has_the_c_compiler_torch_compile_needs(dockerfile: list[list[Instruction]]) -> None:
    """Triton builds its kernel launchers with a C compiler at run time, and inductor compiles C++ for CPU
    parts of a graph: the final stage installs gcc, g++ and libc's headers, without recommended extras."""
    installs = [
        shlex.split(part.split("apt-get install", 1)[1])
        for i in dockerfile[-1]
        if i.keyword == "RUN"
        for part in i.args.split("&&")
        if "apt-get install" in part
    ]
    assert installs, "the final stage installs no packages"
    for words in installs:
        assert "--no-install-recommends" in words
    packages = {word for words in installs for word in words if not word.startswith("-")}
    assert {"gcc", "g++", "libc6-dev"} <= packages


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        assert sep and version and not line.startswith("-"), f"not a name==version pin: {line!r}"
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_image_installs_the_tested_versions(dockerfile: list[list[Instruction]]) -> None:
    """pyproject.toml leaves torch and others open, so the image's install is constrained to the versions
    the tests passed with; the constraints agree with pyproject's own pins, and the CUDA image matches the
    CUDA that torch's wheels were built for."""
    (install,) = [
        i for stage in dockerfile for i in stage if i.keyword == "RUN" and "-r pyproject.toml" in i.args
    ]
    assert "-c docker/constraints.txt" in install.args
    copied = [i.exec_form()[:-1] for stage in dockerfile for i in stage if i.keyword == "COPY"]
    assert ["docker/constraints.txt"] in copied
    pins = constraints()
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        parsed = re.match(r"([A-Za-z0-9_.-]+)\s*([=<>!~]*)\s*(.*)", requirement)
        assert parsed is not None
        name, op, version = parsed.groups()
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in pins, f"{name} is not pinned in docker/constraints.txt"
        if op == "==":
            assert pins[key] == version, f"{name}: pyproject.toml pins {version}, the constraints {pins[key]}"
    cuda_image = resolve(dockerfile[-1][0].args, global_args(dockerfile))
    cuda_version = re.search(r":(\d+\.\d+)\.", cuda_image)
    assert cuda_version is not None
    cuda = cuda_version.group(1)
    assert pins["cuda-toolkit"].startswith(cuda + "."), (cuda_image, pins["cuda-toolkit"])


def test_entrypoint_is_the_copied_script_in_exec_form(dockerfile: list[list[Instruction]]) -> None:
    """ENTRYPOINT is JSON (so the bot gets SIGTERM) and names the script a COPY puts there, executable."""
    final = dockerfile[-1]
    (entrypoint,) = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint.args.startswith("[")
    (script,) = entrypoint.exec_form()
    workdir = next(i.args for i in final if i.keyword == "WORKDIR")
    copies = {
        str(Path(workdir) / i.exec_form()[-1]): i
        for i in final
        if i.keyword == "COPY" and "from" not in i.flags
    }
    assert script in copies and copies[script].flags.get("chmod") == "755"
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern that matches a folder covers what is in it."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_matcher() -> None:
    """The matcher follows Docker's rules closely enough for these tests."""
    patterns = ["**/__pycache__", "data", "*.env", "docs", "!docs/keep.md"]
    assert dockerignored("cogs/__pycache__/x.pyc", patterns)
    assert dockerignored("data/i2p2i.sqlite3", patterns) and not dockerignored("i2p2i_bot/data/x", patterns)
    assert dockerignored("prod.env", patterns) and not dockerignored("env.py", patterns)
    assert dockerignored("docs/other.md", patterns) and not dockerignored("docs/keep.md", patterns)


def test_every_copied_file_reaches_the_build_and_secrets_do_not(dockerfile: list[list[Instruction]]) -> None:
    """Each COPY source exists and is not excluded by .dockerignore; the token file, the virtualenv, the
    data folder and the git history are."""
    patterns = dockerignore_patterns()
    sources = [
        source
        for stage in dockerfile
        for i in stage
        if i.keyword == "COPY" and "from" not in i.flags
        for source in i.exec_form()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "i2p2i_bot", "cogs", "docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, source
        for file in files:
            assert not dockerignored(file.relative_to(ROOT).as_posix(), patterns), file
    for private in (".env", "prod.env", ".venv/bin/python", ".git/config", "data/i2p2i.sqlite3"):
        assert dockerignored(private, patterns), private
    # The package's own data folder is not the runtime data folder.
    assert not dockerignored("i2p2i_bot/data/banned_terms.txt", patterns)


# --- compose.yaml ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


def duration_s(text: str) -> float:
    """A compose duration such as 75s, 1m30s or 2m."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def strings(value: Any) -> list[str]:
    """Every key and string value in a parsed YAML document."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_compose_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    service = compose["services"]["bot"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_token_volume_and_restart(compose: dict[str, Any]) -> None:
    """The token comes from an env file (never written in compose.yaml), /data is a named volume, and the
    container restarts on failure."""
    service = compose["services"]["bot"]
    env_files = service["env_file"] if isinstance(service["env_file"], list) else [service["env_file"]]
    assert ".env" in [e if isinstance(e, str) else e["path"] for e in env_files]
    assert "DISCORD_TOKEN" not in (service.get("environment") or {})
    assert not any("DISCORD_TOKEN" in text for text in strings(compose))
    volume, _, target = service["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert service["build"]["context"] == "."


def test_compose_waits_for_the_graceful_stop(compose: dict[str, Any]) -> None:
    """SIGTERM lets the batch finish for queue.stop_grace_s and then waits as long for the GPU thread, so
    Docker must wait longer than twice that before it kills. An init is PID 1: it reaps the processes
    torch.compile's workers leave and passes SIGTERM to the bot."""
    service = compose["services"]["bot"]
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert service["init"] is True
    grace = duration_s(service["stop_grace_period"])
    assert grace > 2 * QueueSettings().stop_grace_s
    assert duration_s("1m30s") == 90.0


# --- the entry point ------------------------------------------------------------------------------------


@dataclasses.dataclass
class EntrypointRun:
    pid: int
    returncode: int
    calls: list[str]
    stderr: str
    offline: dict[str, str]  # each stand-in's HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE, "-" when unset


OFFLINE = "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1"


@pytest.fixture
def entrypoint(tmp_path: Path):
    """Run docker/entrypoint.sh with stand-ins for `i2p2i` and `i2p2i-bot` that record how they were called
    and whether they were told to stay offline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    env_log = tmp_path / "env.log"
    record_env = (
        'printf "%s HF_HUB_OFFLINE=%s TRANSFORMERS_OFFLINE=%s\\n" "$(basename "$0")" '
        '"${HF_HUB_OFFLINE--}" "${TRANSFORMERS_OFFLINE--}" >> "$STUB_ENV_LOG"\n'
    )
    stubs = {
        "i2p2i": 'printf "i2p2i %s\\n" "$*" >> "$STUB_LOG"\nexit "${STUB_EXIT:-0}"\n',
        # $$ is this process's id: equal to the entry point's, it shows the entry point exec'd the bot.
        "i2p2i-bot": 'printf "i2p2i-bot %s %s\\n" "$$" "$*" >> "$STUB_LOG"\n',
    }
    for name, body in stubs.items():
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n" + record_env + body)
        stub.chmod(0o755)
    data = tmp_path / "data"

    def start(*args: str, **env: str) -> subprocess.Popen[str]:
        log.unlink(missing_ok=True)
        env_log.unlink(missing_ok=True)
        environment = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "I2P2I_DATA_DIR": str(data),
            "I2P2I_FETCH_RETRY_S": "0",
            "STUB_LOG": str(log),
            "STUB_ENV_LOG": str(env_log),
            "HOME": str(tmp_path),
            **env,
        }
        return subprocess.Popen(
            [str(ROOT / "docker" / "entrypoint.sh"), *args],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(process: subprocess.Popen[str]) -> EntrypointRun:
        _, stderr = process.communicate(timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        lines = env_log.read_text().splitlines() if env_log.exists() else []
        offline = dict(line.split(" ", 1) for line in lines)
        return EntrypointRun(process.pid, process.returncode, calls, stderr, offline)

    def run(*args: str, **env: str) -> EntrypointRun:
        return finish(start(*args, **env))

    run.data = data  # type: ignore[attr-defined]
    run.start = start  # type: ignore[attr-defined]
    run.finish = finish  # type: ignore[attr-defined]
    return run


def markers(data: Path) -> list[Path]:
    return sorted((data / "huggingface").glob(".i2p2i-models-*"))


def test_entrypoint_fetches_once_then_execs_the_bot(entrypoint) -> None:
    """First start: download-models, then the bot replaces the shell; second start: the bot only."""
    data: Path = entrypoint.data
    data.mkdir()
    (data / "health.json").write_text('{"state": "ready"}')
    first = entrypoint(I2P2I_MODELS="smoke")
    assert first.returncode == 0, first.stderr
    bot = f"i2p2i-bot {first.pid} --models smoke"
    assert first.calls == ["i2p2i --models smoke download-models", bot]
    # The download may use the network; the bot, with its models in place, is told not to.
    assert first.offline == {"i2p2i": "HF_HUB_OFFLINE=- TRANSFORMERS_OFFLINE=-", "i2p2i-bot": OFFLINE}
    assert len(markers(data)) == 1
    assert not (data / "health.json").exists()  # the last run's heartbeat cannot pass for this one's

    second = entrypoint(I2P2I_MODELS="smoke")
    assert second.returncode == 0
    assert second.calls == [f"i2p2i-bot {second.pid} --models smoke"]
    assert second.offline == {"i2p2i-bot": OFFLINE}


def test_entrypoint_fetches_again_when_the_settings_change(entrypoint, tmp_path: Path) -> None:
    """The marker belongs to the settings: a changed config file (or options) fetches again."""
    config = tmp_path / "config.toml"
    config.write_text('[models]\ngenerator = "a/b"\n')
    first = entrypoint(I2P2I_CONFIG=str(config))
    assert first.calls[0] == f"i2p2i --config {config} download-models"
    assert first.calls[1] == f"i2p2i-bot {first.pid} --config {config}"
    assert entrypoint(I2P2I_CONFIG=str(config)).calls[0].startswith("i2p2i-bot ")
    config.write_text('[models]\ngenerator = "c/d"\n')
    assert entrypoint(I2P2I_CONFIG=str(config)).calls[0] == f"i2p2i --config {config} download-models"
    # Options given as arguments count the same way, and reach both commands.
    again = entrypoint("--config", str(config), "--models", "smoke")
    assert again.calls[0] == f"i2p2i --config {config} --models smoke download-models"
    assert again.calls[1].endswith(f" --config {config} --models smoke")
    assert len(markers(entrypoint.data)) == 3


def test_entrypoint_modes_and_offline(entrypoint) -> None:
    """never skips the fetch, always fetches every time, HF_HUB_OFFLINE skips it with a note; the bot is
    offline unless HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE says otherwise."""
    never = entrypoint(I2P2I_DOWNLOAD_MODELS="never")
    assert never.returncode == 0 and [c.split()[0] for c in never.calls] == ["i2p2i-bot"]
    assert never.offline == {"i2p2i-bot": OFFLINE}
    assert markers(entrypoint.data) == []
    for _ in range(2):
        always = entrypoint(I2P2I_DOWNLOAD_MODELS="always")
        assert [c.split()[0] for c in always.calls] == ["i2p2i", "i2p2i-bot"]
    (data_marker,) = markers(entrypoint.data)
    data_marker.unlink()
    offline = entrypoint(HF_HUB_OFFLINE="1")
    assert offline.returncode == 0 and [c.split()[0] for c in offline.calls] == ["i2p2i-bot"]
    assert "HF_HUB_OFFLINE is set" in offline.stderr and markers(entrypoint.data) == []
    assert offline.offline == {"i2p2i-bot": "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=-"}
    legacy = entrypoint(TRANSFORMERS_OFFLINE="1")
    assert [c.split()[0] for c in legacy.calls] == ["i2p2i-bot"]
    assert legacy.offline == {"i2p2i-bot": "HF_HUB_OFFLINE=- TRANSFORMERS_OFFLINE=1"}
    online = entrypoint(HF_HUB_OFFLINE="0")
    assert [c.split()[0] for c in online.calls] == ["i2p2i", "i2p2i-bot"]
    assert online.offline["i2p2i-bot"] == "HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=-"
    bad = entrypoint(I2P2I_DOWNLOAD_MODELS="sometimes")
    assert bad.returncode == 2 and bad.calls == [] and "must be auto, always or never" in bad.stderr
    bad = entrypoint(I2P2I_FETCH_RETRY_S="soon")
    assert bad.returncode == 2 and bad.calls == [] and "whole number of seconds" in bad.stderr


def test_entrypoint_does_not_start_the_bot_when_the_fetch_fails(entrypoint) -> None:
    """A failed download exits with its code, starts nothing, leaves no marker (the next start retries) and
    says what to do without internet."""
    failed = entrypoint(STUB_EXIT="3")
    assert failed.returncode == 3
    assert failed.calls == ["i2p2i download-models"]
    assert "the bot is not started" in failed.stderr
    assert "I2P2I_DOWNLOAD_MODELS=never" in failed.stderr
    assert "docker compose run --rm bot fetch-models" in failed.stderr
    assert markers(entrypoint.data) == []
    retried = entrypoint()
    assert [c.split()[0] for c in retried.calls] == ["i2p2i", "i2p2i-bot"]


def test_entrypoint_waits_after_a_failed_fetch_and_stops_on_sigterm(entrypoint) -> None:
    """After a failed fetch it waits I2P2I_FETCH_RETRY_S before exiting, so a restart policy does not retry
    at once; SIGTERM (docker stop) ends the wait at once with the fetch's exit code."""
    process = entrypoint.start(STUB_EXIT="3", I2P2I_FETCH_RETRY_S="120")
    assert process.stderr is not None
    lines: list[str] = []
    while not any("exiting in 120 s" in line for line in lines):
        line = process.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    assert process.poll() is None
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stopped = entrypoint.finish(process)
    assert time.monotonic() - started < 10
    assert stopped.returncode == 3 and stopped.calls == ["i2p2i download-models"]


def test_entrypoint_fetch_only_and_unwritable_data(entrypoint, tmp_path: Path) -> None:
    """`fetch-models` (the image build's prefetch) fetches and exits; a data folder that cannot be made
    stops with one line before anything runs."""
    fetched = entrypoint("fetch-models")
    assert fetched.returncode == 0 and fetched.calls == ["i2p2i download-models"]
    assert len(markers(entrypoint.data)) == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    blocked = entrypoint(I2P2I_DATA_DIR=str(blocker / "data"))
    assert blocked.returncode == 2 and blocked.calls == []
    assert "is not a folder that user" in blocked.stderr


def test_compose_workers_profile_runs_redis_as_the_readme_asks_and_a_gpu_worker(
    compose: dict[str, Any],
) -> None:
    """The `workers` profile: Redis append-only without eviction and a worker on a GPU, off by default."""
    services = compose["services"]
    assert "profiles" not in services["bot"]
    redis, worker = services["redis"], services["worker"]
    assert redis["profiles"] == worker["profiles"] == ["workers"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert worker["environment"]["I2P2I_ROLE"] == "worker"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["healthcheck"] == {"disable": True}
