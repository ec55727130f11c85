"""bot.py killed (SIGKILL) at the worst moment of a delivery: Discord has the result, the store does not know.

The real bot.py in a subprocess (started through tests/quick_retries.py, which only shortens the pauses
between retries) against the loopback Discord in this process. The fake kills the bot the
moment it has applied the result's upload, before its answer leaves, so the bot never learns that the post
worked; a second bot.py on the same data directory must then leave exactly one result for the member.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from i2p2i_bot.pending_describes import RESTARTED
from i2p2i_bot.smoke import SmokeModels
from tests import test_bot_lifecycle as lifecycle
from tests.bot_harness import png_bytes
from tests.discord_fake import FakeDiscord, RecordedCall
from tests.discord_fake.__main__ import toml_string

REPO_ROOT = Path(__file__).resolve().parents[1]
EDIT = "PATCH /webhooks/{app}/{token}/messages/{message}"
POST = "POST /channels/{channel}/messages"
START_S = 120.0


class BotProcess:
    """bot.py runs, one at a time, on one config, with retries a hundred times quicker (each failed edit
    would wait out 25 s of discord.py's backoff); its output is kept in a file per start."""

    def __init__(self, server: FakeDiscord, config: Path, cache_dir: Path, logs: Path) -> None:
        self.server = server
        self.config = config
        self.logs = logs
        self.env = {
            **os.environ,
            "DISCORD_TOKEN": server.token,
            "I2P2I_CACHE_DIR": str(cache_dir),
            "I2P2I_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        """Start bot.py and wait until its gateway session has the guild."""
        mark = self.server.frame_mark()
        self._spawn()

        def connected() -> bool:
            assert self.process is not None and self.process.poll() is None, self.output()
            return self.server.gateway.connected and bool(
                self.server.frames(t="GUILD_CREATE", direction="out", since=mark)
            )

        await self.server.wait_until(connected, timeout_s=START_S, what="bot.py to connect")

    def _spawn(self) -> None:
        # A plain Popen, not asyncio's: kill() reaps it synchronously, inside the fake's call observer.
        self.starts += 1
        with (self.logs / f"bot-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.quick_retries", "--config", str(self.config)],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL, and reap it before anything else happens in this process."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def output(self) -> str:
        return "\n".join(
            f"--- bot start {k} ---\n" + (self.logs / f"bot-{k}.log").read_text(errors="replace")[-4000:]
            for k in range(1, self.starts + 1)
        )


def write_config(path: Path, server: FakeDiscord, data_dir: Path, labels_dir: Path) -> None:
    path.write_text(
        "\n".join(
            [
                f"data_dir = {toml_string(str(data_dir))}",
                "[models]",
                'preset = "smoke"',
                "[interrogate]",
                f"labels_dir = {toml_string(str(labels_dir))}",
                "min_flavors = 2",
                "max_flavors = 4",
                "[generate]",
                "steps = 2",
                "width = 64",
                "height = 64",
                "min_side = 64",
                "[discord]",
                f"api_base = {toml_string(server.api_base)}",
                f"gateway_url = {toml_string(server.gateway_url)}",
                "",
            ]
        ),
        encoding="utf-8",
    )


def job_row(database: Path, job_id: int) -> dict[str, Any] | None:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else dict(row)


def result_messages(server: FakeDiscord, job_id: int) -> list[Any]:
    """Every message a member can see that carries job ``job_id``'s images, in the channel or a DM."""
    visible = server.messages_in("general", include_ephemeral=False) + server.dm_messages("alice")
    return [m for m in visible if any(a.filename.startswith(f"job{job_id}-") for a in m.attachments)]


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("case", ["edit", "channel after a failed edit", "channel, token over"])
async def test_sigkill_after_the_result_is_posted_then_a_restart_leaves_one_result(
    server: FakeDiscord,
    tmp_path: Path,
    smoke_cache: Path,
    smoke_models: SmokeModels,
    labels_dir: Path,
    astronaut: Image.Image,
    case: str,
) -> None:
    """Killed after Discord applied the result's upload and before the bot heard back: the restarted bot
    finishes the delivery the same way (an edit again, or the channel post with the same nonce, which
    Discord answers with the first message), and the database is sound."""
    data_dir = tmp_path / "data"
    config = tmp_path / "bot.toml"
    write_config(config, server, data_dir, labels_dir)
    bot = BotProcess(server, config, smoke_cache, tmp_path)
    killed: list[RecordedCall] = []
    route = EDIT if case == "edit" else POST

    def kill_after_the_upload(call: RecordedCall) -> None:
        if not killed and call.route == route and call.files and call.ok:
            killed.append(call)
            bot.kill()  # the answer is still on its way: the bot never reads it

    try:
        await bot.start()
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1})
        await slash.wait_followup(timeout_s=60)
        card = slash.original
        assert card is not None
        generate = next(c for c in card.custom_ids() if c.startswith("i2p:card:gen:"))
        refused_edits = None
        if case == "channel after a failed edit":
            refused_edits = server.fail_next(
                EDIT, status=503, times=10_000, predicate=lambda c: bool(c.files)
            )
        stop = server.observe(kill_after_the_upload)
        # "token over": pressed 14 min 45 s after the interaction began, so the bot's clock sends the result
        # straight to the channel.
        age = {"age_s": 14 * 60 + 45} if case == "channel, token over" else {}
        press = await server.push_button(card, generate, **age)
        await press.wait_followup(timeout_s=60)
        await server.wait_until(lambda: killed or None, timeout_s=120, what="the result's upload")
        stop()
        assert server.errors == []
        assert bot.process is not None and bot.process.returncode == -signal.SIGKILL
        database = data_dir / "i2p2i.sqlite3"
        before = job_row(database, 1)
        assert before is not None and before["status"] == "complete" and before["delivered_at"] is None
        assert len(result_messages(server, 1)) == 1
        if refused_edits is not None:
            refused_edits.remaining = 0  # Discord is well again: an edit now would succeed

        await bot.start()
        await server.wait_until(
            lambda: (job_row(database, 1) or {}).get("delivered_at") or None,
            timeout_s=120,
            what="the delivery",
        )
        # The restarted bot repeated the very upload it had made, and nothing else carried the result.
        redone = [c for c in server.calls(since=killed[0].index + 1) if c.files and c.route in (EDIT, POST)]
        assert [c.route for c in redone] == [route], [str(c) for c in redone]
        if route == POST:
            assert redone[0].json["nonce"] == killed[0].json["nonce"]
            assert redone[0].response["id"] == killed[0].response["id"]
        (result,) = result_messages(server, 1)
        assert result.id == int(killed[0].response["id"])
        assert server.dm_messages("alice") == []
        if case == "edit":
            answered = press.original
            assert answered is not None and result.id == answered.id
        with sqlite3.connect(database) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    except BaseException:
        print(bot.output())
        raise
    finally:
        bot.stop()


# -- a kill while a describe is under way -------------------------------------------------------------------


def pending_rows(database: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM pending_describes ORDER BY created_at")]


@pytest.mark.timeout(180)
async def test_sigkill_during_a_describe_then_a_restart_answers_its_placeholder(
    server: FakeDiscord, tmp_path: Path
) -> None:
    """Killed while describing: the placeholder would think forever. The next start edits it into one
    sentence and forgets the describe; a describe whose token has expired is forgotten without a call."""
    data_dir = tmp_path / "data"
    database = data_dir / "i2p2i.sqlite3"
    config = lifecycle.write_config(tmp_path / "bot.toml", data_dir, server.api_base, server.gateway_url)
    first_log, second_log = tmp_path / "bot-1.log", tmp_path / "bot-2.log"
    process = lifecycle.lifecycle_bot(config, first_log, server.token, describe_hangs=True)
    try:
        await server.wait_until(
            lambda: server.gateway.connected and bool(server.frames(t="GUILD_CREATE", direction="out")),
            timeout_s=60,
            what="bot.py to connect",
        )
        upload = server.add_attachment(png_bytes(Image.new("RGB", (32, 24), "teal")), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload})
        await server.wait_until(
            lambda: "stand-in engine: describing" in first_log.read_text(errors="replace"),
            timeout_s=60,
            what="the describe to reach the GPU",
        )
        placeholder = slash.original
        assert placeholder is not None and placeholder.loading
        (row,) = pending_rows(database)
        assert row["interaction_id"] == slash.id and row["token"] == slash.token
        assert row["message_id"] == placeholder.id and row["user_id"] == server.user("alice").id
        assert row["channel_id"] == server.channel("general").id
        assert row["expires_at"] == pytest.approx(row["created_at"] + 15 * 60)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)

        # A describe from long ago that a kill also cut short: its token is dead, so nothing may use it.
        with sqlite3.connect(database) as db:
            db.execute(
                "INSERT INTO pending_describes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (1, row["application_id"], "expired-token", 2, row["user_id"], None, 1.0, 901.0, None),
            )
        mark = server.mark()
        process = lifecycle.lifecycle_bot(config, second_log, server.token)
        answered = await server.wait_until(
            lambda: server.message(placeholder.id).content == RESTARTED or None,
            timeout_s=60,
            what="the placeholder to be answered",
        )
        assert answered and not server.message(placeholder.id).loading
        edits = [c for c in server.calls(since=mark) if c.params.get("token") == slash.token]
        assert [c.route for c in edits if c.method == "PATCH"] == [EDIT]
        await server.wait_until(lambda: pending_rows(database) == [] or None, timeout_s=30, what="no rows")
        assert server.calls(predicate=lambda c: c.params.get("token") == "expired-token") == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
