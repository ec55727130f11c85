"""The layering rules: the engine and job system never import discord; every extension loads."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import i2p2i_bot

DISCORD_MODULES = {
    "i2p2i_bot.app",
    "i2p2i_bot.replies",
    "i2p2i_bot.cards",
    "i2p2i_bot.job_controls",
    "i2p2i_bot.delivery",
    "i2p2i_bot.decode_queue",
    "i2p2i_bot.pending_describes",
}


def test_engine_modules_do_not_import_discord() -> None:
    """Importing every engine and job-system module leaves discord (and the cogs) unloaded."""
    names = sorted(
        f"i2p2i_bot.{m.name}"
        for m in pkgutil.iter_modules(i2p2i_bot.__path__)
        if f"i2p2i_bot.{m.name}" not in DISCORD_MODULES and m.name != "__main__"
    )
    assert "i2p2i_bot.queue" in names and "i2p2i_bot.engine" in names
    code = (
        "import sys, importlib\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'discord' or m.startswith(('discord.', 'cogs')))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"


def test_every_cog_module_imports() -> None:
    """Each extension in the bot's list imports on its own and has a setup function."""
    from i2p2i_bot.app import EXTENSIONS

    for name in EXTENSIONS:
        module = importlib.import_module(name)
        assert callable(module.setup), name


def test_the_job_system_imports_no_torch() -> None:
    """The request, the job model, the ring, the queue and the store load without torch or diffusers (1-2 s
    saved for every tool that only reads jobs, and for GPU workers' schedulers)."""
    light = (
        "i2p2i_bot.request",
        "i2p2i_bot.guides",
        "i2p2i_bot.batches",
        "i2p2i_bot.interrogation",
        "i2p2i_bot.image_engine",
        "i2p2i_bot.jobs",
        "i2p2i_bot.events",
        "i2p2i_bot.store",
        "i2p2i_bot.ring",
        "i2p2i_bot.queue",
        "i2p2i_bot.config",
        "i2p2i_bot.server_settings",
        "i2p2i_bot.i18n",
        "i2p2i_bot.memory_budget",
    )
    code = (
        "import sys, importlib\n"
        f"for name in {light!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"


def test_the_ring_needs_no_event_loop_database_or_torch() -> None:
    """The fair ring is plain state: remote GPU workers can drive it without asyncio, SQLite or torch."""
    code = (
        "import sys, i2p2i_bot.ring\n"
        "print(sorted(m for m in ('asyncio', 'sqlite3', 'aiosqlite', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"
