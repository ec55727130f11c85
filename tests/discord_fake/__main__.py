"""Watch the unmodified bot serve /imagine-from over the loopback Discord, in two terminals.

    python -m tests.discord_fake serve [--port 8765] [--config-out PATH] [--image PATH] [--out DIR]

``serve`` starts the fake on a fixed port, writes a config for ``bot.py`` (smoke models, this fake's
endpoints) and prints the command to run in a second terminal. Once the bot has connected it plays a
member: uploads an image, runs ``/imagine-from`` with ``count:2``, prints the prompt card, presses Generate,
prints each progress edit, and saves the result's attachments. Then it serves on until Ctrl-C, or exits
with ``--exit-when-done``. Exit status: 0 done, 1 the bot failed or timed out, 2 a usage problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .interactions import InteractionHandle
from .messages import StoredMessage, walk_components
from .server import FakeDiscord

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 8765
DEFAULT_CONFIG = "dev-discord.toml"
DEFAULT_OUT = "demo-out"
# Where the bot keeps smoke models and label tables unless told otherwise: built once, reused by every run.
DEFAULT_CACHE = REPO_ROOT / "data" / "cache"
MEMBER = "alice"
CHANNEL = "general"
GENERATE_PREFIX = "i2p:card:gen:"
BUTTON = 2
# A brief gateway drop is resumed by discord.py; only a longer absence means the bot is gone.
DISCONNECT_GRACE_S = 15.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DemoError(Exception):
    """The demo cannot go on; ``str()`` is one line for the developer, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the config file -------------------------------------------------------------------------------------


def toml_string(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def config_text(server: FakeDiscord, *, data_dir: Path, cache_dir: Path, labels_dir: Path | None) -> str:
    """The bot's settings: smoke models, a throwaway data directory, this fake's REST base and gateway."""
    lines = [
        "# The i2p2i bot against the loopback Discord of `python -m tests.discord_fake serve`.",
        "# Smoke models: tiny random networks, so the prompt is nonsense and the images noise; everything",
        "# between Discord and the models is the real thing.",
        "# [generate] keeps its defaults (512×512, 25 steps): on 2 CPU cores the smoke models make the two",
        "# images in 10-30 s.",
        f"data_dir = {toml_string(str(data_dir))}",
        "",
        "[models]",
        'preset = "smoke"',
        "# Smoke models and label-embedding tables, built on the first run (the labels: a minute or two).",
        f"cache_dir = {toml_string(str(cache_dir))}",
    ]
    if labels_dir is not None:
        lines += ["", "[interrogate]", f"labels_dir = {toml_string(str(labels_dir))}"]
    lines += [
        "",
        "[discord]",
        f"api_base = {toml_string(server.api_base)}",
        f"gateway_url = {toml_string(server.gateway_url)}",
        "",
    ]
    return "\n".join(lines)


def write_config(path: Path, text: str, token: str) -> None:
    """Write the config and load it back exactly as bot.py will, so a bad value fails here."""
    from i2p2i_bot.config import ConfigError, load_settings

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        load_settings(path, env={"DISCORD_TOKEN": token})
    except OSError as exc:
        raise DemoError(f"cannot write the config {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    except ConfigError as exc:
        raise DemoError(f"the config written to {path} does not load: {exc}", EXIT_USAGE) from None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it, else absolute."""
    absolute = Path(os.path.abspath(path))
    with contextlib.suppress(ValueError):
        return str(absolute.relative_to(Path.cwd()))
    return str(absolute)


def bot_command(token: str, config: Path) -> str:
    """The shell line that starts the real bot against this fake."""
    python = shown_path(Path(sys.executable))
    return " ".join(
        [
            f"DISCORD_TOKEN={shlex.quote(token)}",
            shlex.quote(python),
            shlex.quote(shown_path(REPO_ROOT / "bot.py")),
            "--config",
            shlex.quote(shown_path(config)),
        ]
    )


# -- the image the member uploads ------------------------------------------------------------------------


def load_image(path: Path | None) -> tuple[bytes, str]:
    """The bytes and file name to upload: ``path``, or scikit-image's astronaut photograph as PNG."""
    if path is not None:
        try:
            return path.read_bytes(), path.name
        except OSError as exc:
            raise DemoError(f"cannot read --image {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        raise DemoError("scikit-image is not installed; pass --image PATH", EXIT_USAGE) from None
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue(), "astronaut.png"


def image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.2f} MB"


# -- what the bot posted, as text ------------------------------------------------------------------------


def unfence(text: str) -> str:
    """A Markdown code block's body (the bot puts prompts in them)."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= 6:
        stripped = stripped[3:-3].strip("\n")
    return stripped


def indent(text: str, prefix: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join(prefix + line for line in lines)


class Renderer:
    """Message parts as one readable block; ``<@id>`` mentions become ``@name``."""

    def __init__(self, server: FakeDiscord) -> None:
        self._server = server

    def mentions(self, text: str) -> str:
        def name(match: re.Match[str]) -> str:
            user = self._server.world.users.get(int(match[1]))
            return f"@{user.username}" if user is not None else match[0]

        return re.sub(r"<@!?(\d+)>", name, text)

    def buttons(self, message: StoredMessage) -> str:
        shown = []
        for component in walk_components(message.components):
            if component.get("type") != BUTTON:
                continue
            emoji = (component.get("emoji") or {}).get("name")
            label = " ".join(p for p in (emoji, component.get("label")) if p)
            shown.append(f"[{label or component.get('custom_id', '?')}]")
        return " ".join(shown) or "(none)"

    def embed(self, embed: dict[str, Any], prefix: str) -> list[str]:
        """Title, description, fields and footer; the card's and the result's description is the prompt."""
        lines = [f"{prefix}title: {embed.get('title', '')}"]
        if embed.get("description"):
            lines.append(f"{prefix}prompt:")
            lines.append(indent(self.mentions(unfence(embed["description"])), prefix + "  "))
        for field in embed.get("fields", []):
            lines.append(f"{prefix}{field['name']}:")
            lines.append(indent(self.mentions(unfence(field["value"])), prefix + "  "))
        footer = (embed.get("footer") or {}).get("text")
        if footer:
            lines.append(f"{prefix}footer: {footer}")
        return lines


# -- waiting on the bot ----------------------------------------------------------------------------------


class Demo:
    """One run of ``serve``: the fake, the config, and the member's side of the conversation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server = FakeDiscord(port=args.port)
        self.render = Renderer(self.server)
        self.finished = False
        self.synced = False
        self.interrupted = False
        self._gone_since: float | None = None

    async def wait(self, condition: Callable[[], T | None], timeout_s: float, what: str) -> T:
        """``condition``'s first truthy value; DemoError on timeout or when the bot stays disconnected."""
        gone = object()

        def check() -> Any:
            if self.server.gateway.connected:
                self._gone_since = None
            else:
                now = time.monotonic()
                self._gone_since = self._gone_since or now
                if now - self._gone_since > DISCONNECT_GRACE_S:
                    return gone
            return condition()

        try:
            result = await self.server.wait_until(check, timeout_s=timeout_s, what=what)
        except AssertionError:
            raise DemoError(
                f"timed out after {timeout_s:g} s waiting for {what}; look at the bot's terminal for errors,"
                " or give it longer with --timeout"
            ) from None
        if result is gone:
            raise DemoError(f"the bot disconnected while waiting for {what}; look at its terminal for errors")
        return result

    async def wait_answer(self, handle: InteractionHandle, timeout_s: float, what: str) -> StoredMessage:
        """The bot's first visible answer to ``handle``: its original response once it stops "thinking"."""

        def answered() -> StoredMessage | None:
            original = handle.original
            if original is not None and not original.loading:
                return original
            followups = handle.followups
            return followups[0] if followups else None

        return await self.wait(answered, timeout_s, what)

    # -- the steps -----------------------------------------------------------------------------------------

    async def run(self) -> int:
        """The whole demo; SIGINT (Ctrl-C) and SIGTERM stop it cleanly, the fake's socket closed."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers on Windows
                loop.add_signal_handler(sig, self._interrupt, task)
        try:
            return await self._run()
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            say("\nStopped.")
            return EXIT_OK if self.finished else EXIT_INTERRUPTED

    def _interrupt(self, task: asyncio.Task[Any]) -> None:
        self.interrupted = True
        task.cancel()

    async def _run(self) -> int:
        args = self.args
        image = load_image(args.image)  # before anything else: a bad --image is a usage error
        try:
            await self.server.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DemoError(
                    f"port {args.port} on 127.0.0.1 is in use (is another `serve` still running?);"
                    " pick another with --port N",
                    EXIT_USAGE,
                ) from None
            raise DemoError(
                f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}", EXIT_USAGE
            ) from None
        try:
            self.write_config()
            await self.wait_for_bot()
            await self.play(*image)
            self.finished = True
            if args.exit_when_done:
                say("Done (--exit-when-done).")
                return EXIT_OK
            say("Done. Still serving, so the bot stays connected; Ctrl-C stops (then stop the bot too).")
            await asyncio.Event().wait()
            return EXIT_OK
        finally:
            await self.server.stop()

    def write_config(self) -> None:
        args = self.args
        server = self.server
        data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="i2p2i-demo-"))
        config = args.config_out
        text = config_text(
            server,
            data_dir=Path(os.path.abspath(data_dir)),
            cache_dir=Path(os.path.abspath(args.cache_dir)),
            labels_dir=Path(os.path.abspath(args.labels_dir)) if args.labels_dir else None,
        )
        write_config(config, text, server.token)
        say(f"Fake Discord listening on {server.base_url} (gateway {server.gateway_url})")
        say(f"Wrote {shown_path(config)}: smoke models, data in {data_dir}")
        say()
        say("In a second terminal, from this directory, run:")
        say()
        say(f"    {bot_command(server.token, config)}")
        say()

    async def wait_for_bot(self) -> None:
        """Until the bot's gateway session has its guild; say what happens on the way."""
        server = self.server
        timeout_s = self.args.connect_timeout
        say(f"Waiting up to {timeout_s:g} s for the bot to connect...")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        bad_token = logged_in = False
        good = f"Bot {server.token}"
        while not (server.gateway.connected and server.frames(t="GUILD_CREATE", direction="out")):
            calls = server.calls()
            if not bad_token and any(c.status == 401 and c.authorization != good for c in calls):
                bad_token = True
                say(f"  A client sent a wrong token; start the bot with DISCORD_TOKEN={server.token}")
            if not logged_in and any(c.authorization == good and c.ok for c in calls):
                logged_in = True
                say("  The bot logged in; it is loading its models (the first run builds them: minutes)...")
            if loop.time() > deadline:
                if logged_in:
                    raise DemoError(
                        f"the bot logged in but did not connect to the gateway within {timeout_s:g} s;"
                        " it may still be loading models: look at its terminal, or raise --connect-timeout"
                    )
                raise DemoError(
                    f"no bot connected within {timeout_s:g} s; check that it runs with"
                    f" DISCORD_TOKEN={server.token} and --config {shown_path(self.args.config_out)}"
                    f" (whose api_base must be {server.api_base}), and look at its terminal for errors"
                )
            await asyncio.sleep(0.1)
        commands = sorted(command["name"] for command in server.synced_commands())
        self.synced = server.command("imagine-from", guild=server.guild) is not None
        if self.synced:
            listed = ", ".join(commands)
            say(
                f"The bot connected as {server.world.bot_user.username};"
                f" it synced {len(commands)} commands: {listed}"
            )
        else:
            say(
                "The bot connected but synced no /imagine-from (its data directory says they are synced"
                " already); running it anyway"
            )
        say()

    async def play(self, data: bytes, filename: str) -> None:
        args = self.args
        server = self.server
        size = image_size(data)
        dims = f"{size[0]}×{size[1]}, " if size else ""
        upload = server.add_attachment(data, filename, channel=CHANNEL)
        say(
            f"{MEMBER} uploads {filename} ({dims}{human_bytes(len(data))}) and runs"
            f" /imagine-from image:{filename} count:{args.count} in #{CHANNEL}"
        )
        started = time.monotonic()
        slash = await server.push_slash(
            "imagine-from",
            {"image": upload, "count": args.count},
            user=MEMBER,
            channel=CHANNEL,
            require_synced=self.synced,
        )
        card = await self.wait_answer(slash, args.timeout, "the prompt card")
        self.print_card(card, time.monotonic() - started)
        generate = next((c for c in card.custom_ids() if c.startswith(GENERATE_PREFIX)), None)
        if generate is None:
            raise DemoError(f"the card has no Generate button (buttons: {self.render.buttons(card)})")

        say(f"{MEMBER} presses Generate")
        pressed = time.monotonic()
        press = await server.push_button(card, generate, user=MEMBER)
        job = await self.wait_answer(press, args.timeout, "the job's message")
        result = await self.follow_progress(press, job, pressed)
        self.print_result(result, time.monotonic() - pressed)

    def print_card(self, card: StoredMessage, took_s: float) -> None:
        if not card.embeds or not str(card.embeds[0].get("title", "")).startswith("Prompt"):
            raise DemoError(f"the bot answered without a prompt card: {self.render.mentions(card.content)!r}")
        say(f"Prompt card after {took_s:.1f} s:")
        for line in self.render.embed(card.embeds[0], "  "):
            say(line)
        say(f"  buttons: {self.render.buttons(card)}")
        say()

    async def follow_progress(
        self, press: InteractionHandle, job: StoredMessage, since: float
    ) -> StoredMessage:
        """Print each new state of the job's message until it carries files; returns that state."""
        deadline = time.monotonic() + self.args.timeout
        last = ""
        message = job
        while not message.attachments:
            if message.content != last:
                last = message.content
                say(f"  [{time.monotonic() - since:5.1f} s] {self.render.mentions(last)}")
            current = message

            def changed(current: StoredMessage = current, seen: str = last) -> StoredMessage | None:
                latest = press.original or current
                return latest if latest.attachments or latest.content != seen else None

            message = await self.wait(changed, max(0.1, deadline - time.monotonic()), "the job's result")
        return message

    def print_result(self, result: StoredMessage, took_s: float) -> None:
        say(f"  [{took_s:5.1f} s] {self.render.mentions(result.content)}")
        say()
        say(f"Result after {took_s:.1f} s:")
        for embed in result.embeds:
            for line in self.render.embed(embed, "  "):
                say(line)
        say(f"  buttons: {self.render.buttons(result)}")
        out = self.args.out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DemoError(f"cannot create --out {out}: {exc.strerror or exc}", EXIT_USAGE) from None
        say(f"  attachments, saved to {shown_path(out)}:")
        for attachment in result.attachments:
            path = out / Path(attachment.filename).name
            path.write_bytes(attachment.data)
            size = image_size(attachment.data)
            dims = f"{size[0]}×{size[1]} px, " if size else ""
            say(f"    {shown_path(path)}  ({dims}{human_bytes(attachment.size)})")
        say()


# -- the command line ------------------------------------------------------------------------------------


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535 (got {text})")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m tests.discord_fake",
        description="The loopback Discord, for watching the real bot without Discord.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a fake Discord on a fixed port and play a member running /imagine-from",
        description=(
            "Start the fake Discord, write a config for bot.py, wait for the bot, then upload an image, run"
            " /imagine-from, press Generate and save the result."
        ),
    )
    serve.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="default %(default)s")
    serve.add_argument(
        "--config-out",
        type=Path,
        default=Path(DEFAULT_CONFIG),
        metavar="PATH",
        help="the bot's config file to write (default %(default)s)",
    )
    serve.add_argument(
        "--image", type=Path, metavar="PATH", help="the image to describe (default: scikit-image's astronaut)"
    )
    serve.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        metavar="DIR",
        help="where the results go (default ./%(default)s)",
    )
    serve.add_argument(
        "--count", type=int, choices=range(1, 9), default=2, metavar="N", help="images, 1-8 (default 2)"
    )
    serve.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="the bot's data directory (default: a new temporary one)"
    )
    serve.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        metavar="DIR",
        help="smoke models and label tables, kept between runs (default %(default)s)",
    )
    serve.add_argument(
        "--labels-dir",
        type=Path,
        metavar="DIR",
        help="the bot's interrogate.labels_dir (default: the packaged lists)",
    )
    serve.add_argument(
        "--connect-timeout",
        type=positive,
        default=600.0,
        metavar="S",
        help="how long to wait for the bot to start and connect (default %(default)g)",
    )
    serve.add_argument(
        "--timeout",
        type=positive,
        default=300.0,
        metavar="S",
        help="how long to wait for the card, and then for the result (default %(default)g)",
    )
    serve.add_argument("--exit-when-done", action="store_true", help="exit once the result is saved")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    logging.basicConfig(level=logging.WARNING, format="fake Discord %(levelname)s %(name)s: %(message)s")
    demo = Demo(args)
    try:
        return asyncio.run(demo.run())
    except DemoError as exc:
        print(f"serve: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        say("\nStopped.")
        return EXIT_OK if demo.finished else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
