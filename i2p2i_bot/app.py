"""The Discord application: the bot, the services its cogs use, and a clean start and stop.

This module, replies.py, cards.py, job_controls.py, delivery.py, decode_queue.py and pending_describes.py
are the package's only Discord code; the engine and the job system never import discord, and nothing here
imports the cogs except by extension name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import re
import signal
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands
from discord.utils import MISSING

from i2p2i_bot import progress_bars
from i2p2i_bot.config import ConfigError, Settings, load_settings
from i2p2i_bot.decode_queue import DecodeQueue
from i2p2i_bot.delivery import ResultDelivery
from i2p2i_bot.describes_in_flight import DescribesInFlight
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import GpuWorker, Priority
from i2p2i_bot.health import HEALTH_FILE, BotStatus, run_heartbeat
from i2p2i_bot.i18n import catalogue, tr
from i2p2i_bot.image_engine import ImageEngine
from i2p2i_bot.interrogation_cache import InterrogationCache
from i2p2i_bot.job_controls import ImageActions, JobButton
from i2p2i_bot.models import ModelUnavailable
from i2p2i_bot.pending_describes import PendingDescribes
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.replies import Refusal, report_error
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.server_settings import ServerSettingsBook, channel_list
from i2p2i_bot.store import Store, StoreError
from i2p2i_bot.terms import BannedTerms

if TYPE_CHECKING:
    from i2p2i_bot.remote import RemoteRunner
    from i2p2i_bot.worker_capabilities import Mismatch

log = logging.getLogger("i2p2i.bot")

# Loaded one by one; a broken cog is logged and the others still load.
EXTENSIONS: tuple[str, ...] = (
    "cogs.imagine",
    "cogs.history",
    "cogs.admin",
    "cogs.settings",
    "cogs.reply_edit",
    "cogs.loras",
)
EXIT_CONFIG = 2
# The GPU failed for good (a CUDA fault, or a task that never returns): only a new process gets it back.
EXIT_GPU_LOST = 3
# Discord could not be reached at start for discord.start_retry_s: no network, a DNS failure, an outage.
EXIT_DISCORD_UNREACHABLE = 4
# What login may fail with while Discord is out of reach: no connection (aiohttp's errors: refused, reset,
# DNS, TLS, timeouts) or a Discord answering 5xx. A wrong token (LoginFailure) is not among them.
UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientError,
    discord.DiscordServerError,
    discord.GatewayNotFound,
)
# The pause between tries at start: doubled after each, up to the second figure.
START_RETRY_FIRST_DELAY_S = 1.0
START_RETRY_MAX_DELAY_S = 16.0
# How often the bot checks that its GPU can still work.
GPU_WATCH_INTERVAL_S = 5.0

EngineLoader = Callable[[Settings], ImageEngine]


def load_engine(settings: Settings) -> ImageEngine:
    """The bot's models: with queue.backend = "redis" GPU workers make every image, so its own GPU holds
    the interrogation models alone (no Stable Diffusion weights needed on this machine)."""
    return Engine.load(settings, generate=settings.queue.backend != "redis")


class StoppedDuringStart(Exception):
    """A stop (SIGTERM, Ctrl-C) came while the bot was still setting up: it goes no further."""


class DiscordUnreachable(Exception):
    """Discord could not be reached at start; the message is bot.py's one line about it."""

    def __init__(self, reason: str, tries: int, elapsed_s: float) -> None:
        self.reason = reason
        self.tries = tries
        self.elapsed_s = elapsed_s
        spent = f" after {tries} tries in {elapsed_s:.0f} s" if tries > 1 else ""
        super().__init__(
            f"Discord could not be reached{spent} ({reason}); check this machine's network and DNS, "
            "https://discordstatus.com, and discord.api_base if you set it"
        )


def unreachable_reason(exc: BaseException) -> str:
    """What kept Discord out of reach, in a few words for a log line."""
    if isinstance(exc, discord.HTTPException):
        return f"it answered HTTP {exc.status}"
    return str(exc) or type(exc).__name__


class CatalogueTranslator(app_commands.Translator):
    """Command descriptions, choice names and the context menu in each member's language (i18n.py); command
    and option names stay as they are, so they read the same in every language's docs."""

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        found = catalogue(str(locale))
        if found is None:
            return None
        names = (
            app_commands.TranslationContextLocation.command_name,
            app_commands.TranslationContextLocation.group_name,
            app_commands.TranslationContextLocation.parameter_name,
        )
        if context.location in names and not isinstance(context.data, app_commands.ContextMenu):
            return None
        return found.commands.get(string.message)


class I2P2ITree(app_commands.CommandTree["I2P2IBot"]):
    """The command tree with the one error handler every command shares."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """Commands only in the channels a server chose (and their threads); admins anywhere."""
        bot = interaction.client
        if (
            interaction.guild_id is None
            or interaction.type is not discord.InteractionType.application_command
            or not isinstance(bot, I2P2IBot)
        ):
            return True
        server = bot.servers.get(interaction.guild_id)
        parent_id = getattr(interaction.channel, "parent_id", None)
        if server.allows_channel(interaction.channel_id) or (parent_id and server.allows_channel(parent_id)):
            return True
        if bot.is_admin(interaction.user):
            return True
        raise Refusal(f"In this server I answer only in {channel_list(server.channel_ids)}.")

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report_error(interaction, error)


class I2P2IBot(commands.Bot):
    """The bot. Services are created in setup_hook, before the gateway connects."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine_loader: EngineLoader | None = None,
        extensions: Sequence[str] = EXTENSIONS,
        **options: Any,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = (
            True  # channels and roles; attachments arrive inside interactions, no privileged intent
        )
        if settings.discord.reply_edits:
            # Replies to the bot's cards and results, with their text: message content is privileged.
            intents.guild_messages = intents.dm_messages = intents.message_content = True
        options.setdefault(
            "allowed_mentions", discord.AllowedMentions(everyone=False, roles=False, users=True)
        )
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=I2P2ITree,
            **options,
        )
        self.settings = settings
        self.extension_names = tuple(extensions)
        self.failed_extensions: list[str] = []
        self._engine_loader: EngineLoader = engine_loader or load_engine
        self.banned = BannedTerms.from_settings(settings.interrogate)
        self.describes = DescribesInFlight(settings.interrogate.max_describes_per_user)
        self.sources_dir = settings.sources_path
        self.store: Store
        self.gpu: GpuWorker
        self.engine: ImageEngine
        self.queue: JobQueue
        self.servers: ServerSettingsBook
        self.interrogations: InterrogationCache
        self.runner: JobRunner | RemoteRunner
        self.delivery = ResultDelivery(self)
        self.decodes = DecodeQueue(settings.intake)
        self.pending_describes = PendingDescribes(self)
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._setup_started = False
        # The wait on Discord that close() ends at once (see until_closed); None while there is none.
        self._discord_wait: asyncio.Task[Any] | None = None
        # What bot.py exits with once the bot has closed.
        self.exit_code = 0

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def login(self, token: str) -> None:
        """discord.py's login, tried again while Discord cannot be reached, for up to discord.start_retry_s.

        At boot the network or DNS is often not up yet, and an outage may be short: trying again here costs
        nothing (the models load only after login), and a bot that gives up at once would be restarted in
        a tight loop, which can exhaust systemd's start limit. Raises DiscordUnreachable when the time is
        spent, or when Discord is lost during setup_hook, which cannot run twice. Returns without logging
        in when close() is called meanwhile; connect() then ends at once.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up_at = started + self.settings.discord.start_retry_s
        delay_s = START_RETRY_FIRST_DELAY_S
        tries = 0
        while True:
            tries += 1
            try:
                await self.until_closed(super().login(token), name="i2p2i-login")
                return
            except UNREACHABLE_ERRORS as exc:
                reason = unreachable_reason(exc)
                remaining_s = give_up_at - loop.time()
                if self._setup_started or remaining_s <= 0:
                    raise DiscordUnreachable(reason, tries, loop.time() - started) from exc
            wait_s = min(delay_s, remaining_s)
            log.warning("Discord could not be reached (%s); trying again in %.1f s", reason, wait_s)
            # The failed try's session; closing it closes its connector too, so the next try makes both anew.
            await self.http.close()
            self.http.connector = MISSING
            if not await self.until_closed(asyncio.sleep(wait_s), name="i2p2i-login-wait"):
                return
            delay_s = min(2 * delay_s, START_RETRY_MAX_DELAY_S)

    async def setup_hook(self) -> None:
        self._setup_started = True
        # From here until the gateway loop starts, close() lets the setup run on: cut off, it would leave
        # services half made.
        self._discord_wait = None
        settings = self.settings
        # First, so the heartbeat says "starting" while the models load; close() cancels it with the rest.
        self.spawn(
            run_heartbeat(settings.data_path / HEALTH_FILE, self.health_status), name="i2p2i-heartbeat"
        )
        info = await self.application_info()
        if info.team is not None:
            self.owner_ids = {member.id for member in info.team.members}
        else:
            self.owner_id = info.owner.id
        self.store = await Store.from_settings(settings)
        # Before the models load, which takes minutes: the placeholders' tokens live only 15.
        await self.pending_describes.start()
        self.gpu = GpuWorker()
        # Models load on the GPU thread, which owns them from then on.
        self.engine = await self.gpu.run(self._engine_loader, settings, priority=Priority.URGENT)
        # Loading takes minutes with real models; a stop meanwhile has closed Discord's session and the
        # store, so setting up further would only fail.
        if self._closing:
            raise StoppedDuringStart("stopped while the models loaded")
        self.queue = await JobQueue.open(self.store, settings.queue)
        self.servers = await ServerSettingsBook.open(self.store, settings.generate, self.banned)
        if not settings.generate.safety_checker:
            log.warning(
                "generate.safety_checker is off: no image is flagged, so every image is posted in every "
                "channel and DM, whatever the servers' nsfw settings say"
            )
        self.interrogations = InterrogationCache(self.store, self.gpu)
        if settings.queue.backend == "redis":
            from i2p2i_bot.remote import RemoteRunner  # BullMQ is installed only where it is used

            self.runner = RemoteRunner(
                self.queue, settings.queue, presets=self.engine.presets, sources_dir=settings.sources_path
            )
        else:
            self.runner = JobRunner(self.queue, self.engine, self.gpu, timeout_s=settings.queue.job_timeout_s)
        self.runner.start()
        # Job buttons work on every job message, whichever cog posted it, and after a restart.
        self.add_dynamic_items(JobButton, ImageActions)
        await self.delivery.start()
        self.spawn(self._watch_gpu(), name="i2p2i-gpu-watch")
        await self.tree.set_translator(CatalogueTranslator())
        for name in self.extension_names:
            try:
                await self.load_extension(name)
            except Exception:
                self.failed_extensions.append(name)
                log.exception("extension %s failed to load; the others go on", name)
        await self.sync_commands()
        # The model libraries leave ~600k long-lived objects; every full collection walked them all and
        # paused the event loop for 0.4-0.7 s. Freezing them keeps collections to what serving allocates.
        gc.collect()
        gc.freeze()
        log.info("setup done: %d commands, extensions %s", len(self.tree.get_commands()), self.extensions)

    async def connect(self, *, reconnect: bool = True) -> None:
        """discord.py's gateway loop, which close() ends at once, even between connection attempts."""
        await self.until_closed(super().connect(reconnect=reconnect), name="i2p2i-gateway")

    async def until_closed(self, wait: Coroutine[Any, Any, Any], *, name: str) -> bool:
        """Run `wait`, a wait on Discord, in a task that close() cancels; False when close() ended it.

        discord.py notices close() only between the steps of its gateway loop: a stop during its reconnect
        backoff (a sleep that grows to ~17 min) or a connection attempt (up to 60 s) waited for it, past
        the grace a service manager gives before it kills the bot.
        """
        if self._closing:
            wait.close()
            return False
        task = asyncio.create_task(wait, name=name)
        self._discord_wait = task
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Only close() holds `task`; a cancel of this task itself goes on up.
            if task.cancelled() and self._closing and (current is None or not current.cancelling()):
                return False
            raise
        finally:
            if self._discord_wait is task:
                self._discord_wait = None
        return True

    async def close(self) -> None:
        if self._closing:
            return await super().close()
        self._closing = True
        log.info("shutting down: no new jobs; the running batch may finish")
        if hasattr(self, "runner"):
            await self.runner.stop(self.settings.queue.stop_grace_s)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if hasattr(self, "queue"):  # the delivery started with the queue; it edits before Discord closes
            await self.delivery.stop()
        # discord.py itself calls close() from inside its gateway loop when a close code is final; that
        # loop then ends by itself, and must not be cancelled under this very call.
        waiting = self._discord_wait
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()
        await super().close()
        if hasattr(self, "gpu"):
            await asyncio.to_thread(self.gpu.close, True, self.settings.queue.stop_grace_s)
        if hasattr(self, "store"):
            await self.store.close()
        log.info("stopped")

    def begin_close(self) -> asyncio.Task[None]:
        """Close the bot in a task of its own, for a signal handler or a watch; the same task every time."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self.close(), name="i2p2i-close")
        return self._close_task

    @property
    def close_task(self) -> asyncio.Task[None] | None:
        """The close begin_close() started, or None."""
        return self._close_task

    def spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        """Run a background task whose reference is kept and whose failure is logged with its traceback."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def workers_problem(self) -> str | None:
        """Why remote GPU workers cannot be reached now ("GPU workers unreachable"); None when they can."""
        runner = getattr(self, "runner", None)
        return getattr(runner, "problem", None)

    def workers_notice(self, locale: str | None = None) -> str | None:
        """The line /queue and /admin queue open with while remote GPU workers cannot be reached."""
        problem = self.workers_problem()
        if problem is None:
            return None
        return tr(
            locale,
            "⚠️ {problem}: jobs wait in the queue and start once the workers can be reached again.",
            problem=tr(locale, problem),
        )

    def presets_notice(self, locale: str | None = None) -> str | None:
        """The line /admin queue opens with while live GPU workers give a preset other weights than the
        bot's config: they get none of its jobs (worker_capabilities.Mismatch)."""
        runner = getattr(self, "runner", None)
        mismatches: Sequence[Mismatch] = getattr(runner, "mismatches", ())
        if not mismatches:
            return None
        found = "; ".join(
            tr(
                locale,
                "{preset} ({worker} on a worker, {bot} in the bot's config)",
                preset=m.preset,
                worker=m.worker,
                bot=m.bot,
            )
            for m in mismatches
        )
        return tr(
            locale,
            "⚠️ GPU workers get no jobs of a preset they have with other weights than the bot: {found}.",
            found=found,
        )

    def gpu_lost(self) -> str | None:
        """Why the GPU can do no more work in this process, or None while it can."""
        gpu: GpuWorker | None = getattr(self, "gpu", None)
        if gpu is None:
            return None
        if gpu.device_fault is not None:
            return f"a CUDA error left it unusable ({gpu.device_fault})"
        limit_s = 2 * self.settings.queue.job_timeout_s
        if gpu.busy_for_s() > limit_s:
            return f"one task has held it for more than {limit_s:g} s (twice queue.job_timeout_s)"
        return None

    async def _watch_gpu(self) -> None:
        """Stop the bot, with EXIT_GPU_LOST, once its GPU can do no more work.

        Only a new process gets the GPU back; a bot that stays up without one would answer every member
        with a failure. Queued jobs stay in the store, and a service manager (Docker's restart policy,
        systemd's Restart=) starts the bot again, which resumes them.
        """
        while True:
            reason = self.gpu_lost()
            if reason is not None:
                break
            await asyncio.sleep(GPU_WATCH_INTERVAL_S)
        log.critical("the GPU can do no more work: %s; stopping so that a restart gets it back", reason)
        self.exit_code = EXIT_GPU_LOST
        # Not a child of this task: close() cancels the background tasks, this one included.
        self.begin_close()

    def health_status(self) -> BotStatus:
        """What the heartbeat file reports; during setup_hook some services do not exist yet."""
        queue: JobQueue | None = getattr(self, "queue", None)
        gpu: GpuWorker | None = getattr(self, "gpu", None)
        runner: JobRunner | RemoteRunner | None = getattr(self, "runner", None)
        jobs = queue.active_jobs() if queue is not None else []
        running = sum(job.status == "running" for job in jobs)
        ws = self.ws
        ready = self.is_ready()
        return BotStatus(
            state="stopping" if self._closing else "ready" if ready else "starting",
            gateway_connected=ready and not self.is_closed() and ws is not None and ws.open,
            queued_jobs=len(jobs) - running,
            running_jobs=running,
            gpu_worker_alive=gpu is not None and gpu.thread.is_alive(),
            runner_alive=runner is not None and runner.running,
            gpu_stuck=ready and gpu is not None and gpu.busy_for_s() > 2 * self.settings.queue.job_timeout_s,
            gpu_faulted=gpu is not None and gpu.device_fault is not None,
            queue_paused=queue is not None and queue.paused,
            workers_unreachable=self.workers_problem() is not None,
        )

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """One log line per interaction: what, by whom, where; never its token."""
        data: dict[str, Any] = dict(interaction.data or {})
        what = data.get("name") or data.get("custom_id") or "?"
        log.info(
            "interaction %s: %s %r by user %s in channel %s",
            interaction.id,
            interaction.type.name,
            what,
            interaction.user.id,
            interaction.channel_id,
        )

    # -- commands ----------------------------------------------------------------------------------------

    async def sync_commands(self) -> bool:
        """Sync application commands only when they differ from the last sync; True when it synced."""
        guild_id = self.settings.discord.sync_guild_id
        guild = discord.Object(guild_id) if guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        translator = self.tree.translator
        commands = self.tree._get_all_commands(guild=guild)
        payload = [
            await command.get_translated_payload(self.tree, translator)
            if translator is not None
            else command.to_dict(self.tree)
            for command in commands
        ]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        marker = self.settings.data_path / "commands-synced.json"
        scope = str(guild_id or "global")
        synced: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            synced = json.loads(marker.read_text(encoding="utf-8"))
        if synced.get(scope) == digest:
            log.info("commands unchanged since the last sync; not syncing")
            return False
        await self.tree.sync(guild=guild)
        synced[scope] = digest
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(synced), encoding="utf-8")
        log.info("synced %d commands (%s)", len(payload), scope)
        return True

    # -- permissions -------------------------------------------------------------------------------------

    def is_admin(self, user: discord.abc.User) -> bool:
        """The application's owner, or a member with one of the configured admin roles."""
        if self.owner_id is not None and user.id == self.owner_id:
            return True
        if self.owner_ids and user.id in self.owner_ids:
            return True
        roles = getattr(user, "roles", ())
        admin_roles = set(self.settings.discord.admin_role_ids)
        return any(role.id in admin_roles for role in roles)


def apply_endpoints(settings: Settings) -> None:
    """Point discord.py at the configured REST base and gateway (a proxy, or a test double).

    Both are class attributes in discord.py, so this is process-wide; one bot runs per process.
    """
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    Route.BASE = settings.discord.api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord.gateway_url)


def create_bot(settings: Settings, *, engine_loader: EngineLoader | None = None, **options: Any) -> I2P2IBot:
    """The bot that bot.py runs, built the same way for tests."""
    apply_endpoints(settings)
    redact_tokens_in_logs()
    return I2P2IBot(settings, engine_loader=engine_loader, **options)


# An interaction's token answers it, edits and deletes its messages for 15 minutes; discord.py puts it in
# the URLs it logs (requests at DEBUG, rate limits at WARNING) and the gateway logs each event's payload at
# DEBUG. These are the loggers that write them.
TOKEN_LOGGERS = ("discord.http", "discord.webhook.async_", "discord.gateway")
_TOKENS = (
    # /interactions/{id}/{token}/callback and /webhooks/{application_id}/{token}/...
    (re.compile(r"(/(?:interactions|webhooks)/\d+/)[^/?#\s'\"]+"), r"\1[token]"),
    # 'token': '...' in a gateway payload (INTERACTION_CREATE, VOICE_SERVER_UPDATE)
    (re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]*"""), r"\1[token]"),
)


class RedactTokens(logging.Filter):
    """Replaces the interaction and webhook tokens in a record's message with [token]."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: the handler reports it, as it would without this filter
            return True
        redacted = message
        for pattern, replacement in _TOKENS:
            redacted = pattern.sub(replacement, redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_tokens_in_logs() -> None:
    """Keep tokens out of discord.py's log records, whatever level and handlers logging is set up with."""
    for name in TOKEN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
    # aiosqlite logs every statement at DEBUG with its bound values (a job's interaction token and prompt
    # among them), with nothing around a token to find it by: those lines stay out even at DEBUG.
    sql = logging.getLogger("aiosqlite")
    if sql.level == logging.NOTSET or sql.level < logging.INFO:
        sql.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """The bot's command line (`i2p2i-bot`, and bot.py in a checkout): [--config PATH] [--models PRESET]."""
    prog = prog or Path(sys.argv[0]).name or "i2p2i-bot"
    parser = argparse.ArgumentParser(prog=prog, description="Run the i2p2i Discord bot.")
    parser.add_argument("--config", metavar="PATH", help="settings file (TOML); see config.example.toml")
    parser.add_argument("--models", choices=("default", "smoke"), help="'smoke': tiny random models (noise)")
    args = parser.parse_args(argv)
    return run_bot(args.config, args.models, prog=prog)


def run_bot(config_path: str | Path | None, models: str | None = None, *, prog: str = "bot.py") -> int:
    """The bot's process: settings, token check, run until SIGTERM/SIGINT; returns the exit code.

    Each way it can fail to start is one line on stderr, `prog: ...`, and an exit code of its own.
    """
    try:
        settings = load_settings(config_path)
        if models:
            settings = settings.with_preset(models)  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    token = settings.discord.token
    if not token:
        print(
            f"{prog}: DISCORD_TOKEN is not set; put the bot's token in that environment variable",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    discord.utils.setup_logging(level=logging.INFO)
    progress_bars.only_on_a_terminal()
    bot = create_bot(settings)

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bot.begin_close)
        async with bot:
            try:
                await bot.start(token)
            except discord.LoginFailure:
                print(
                    f"{prog}: Discord rejected the token in DISCORD_TOKEN; check it in the Developer Portal",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            except StoppedDuringStart as exc:
                log.info("%s; nothing was started", exc)
            except DiscordUnreachable as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return EXIT_DISCORD_UNREACHABLE
            except ModelUnavailable as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            except (StoreError, sqlite3.DatabaseError) as exc:
                print(
                    f"{prog}: the database {settings.database_path} cannot be used ({exc}); see "
                    '"Upgrading" and "Backing up the database" in the README',
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            # Whoever began the close, a signal or the GPU watch, it ends before the process does: asyncio.run
            # would cancel it half way, before the database and the GPU thread are closed.
            if bot.close_task is not None:
                await bot.close_task
        if bot.exit_code == EXIT_GPU_LOST:
            print(f"{prog}: stopped because the GPU can do no more work ({bot.gpu_lost()})", file=sys.stderr)
        return bot.exit_code

    return asyncio.run(runner())
