"""Online backups of the SQLite database: a consistent copy taken while the bot runs, then checked.

SQLite's backup API copies the database page by page inside one read transaction, so the copy is the
database as of one commit: writes committed later, and transactions still open, are not in it. In WAL mode
a reader does not block the bot's writers, so the bot keeps working while the copy is made. The copy is
written beside its destination under a temporary name, checked with `PRAGMA integrity_check`, flushed to
disk, and only then renamed into place: a file at the destination is always a complete, checked copy.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path


class BackupError(Exception):
    """The backup could not be made or did not pass its check; the message is one line."""


@dataclass(frozen=True)
class BackupResult:
    source: Path
    dest: Path
    size_bytes: int
    schema_version: int


def backup_database(
    source: str | Path, dest: str | Path, *, busy_timeout_ms: int = 5000, now: float | None = None
) -> BackupResult:
    """Copy the database at `source` to `dest` (a new file, or a folder for a dated copy), then check it."""
    source = Path(source)
    names_folder = str(dest).endswith(("/", os.sep))  # Path() drops a trailing slash
    dest = Path(dest).expanduser()
    if not source.is_file():
        raise BackupError(f"there is no database at {source}")
    if dest.is_dir():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
        dest = dest / f"{source.stem}-{stamp}{source.suffix or '.sqlite3'}"
    elif names_folder:
        raise BackupError(f"the folder {dest} does not exist")
    if dest.exists():
        raise BackupError(f"{dest} already exists; name a new file or a folder")
    if not dest.parent.is_dir():
        raise BackupError(f"the folder {dest.parent} does not exist")
    partial = dest.with_name(f".{dest.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()  # left by a backup that was killed; never a finished copy
    try:
        _copy(source, partial, busy_timeout_ms)
        schema_version = _check(partial)
        _flush(partial)
        os.replace(partial, dest)
        _flush(dest.parent)
    except sqlite3.Error as exc:
        raise BackupError(f"the backup of {source} failed: {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        for leftover in (partial, *_sidecars(partial)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return BackupResult(source, dest, dest.stat().st_size, schema_version)


def _copy(source: Path, target: Path, busy_timeout_ms: int) -> None:
    # mode=rw: a missing or mistyped path fails instead of creating an empty database to back up.
    uri = f"{source.resolve().as_uri()}?mode=rw"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout_ms / 1000)) as src:
        # Reading page 1 first turns "not a database" into an error here rather than a copy of garbage.
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        with contextlib.closing(sqlite3.connect(target)) as dst:
            # pages=-1: the whole database in one step, so the copy is one snapshot and never restarts
            # because a writer committed in between steps.
            src.backup(dst, pages=-1)


def _check(path: Path) -> int:
    """Run integrity_check on the copy; return its schema version, or raise with the first problem found."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        problems = [row[0] for row in db.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            extra = len(problems) - 1
            more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
            raise BackupError(
                f"the copy failed its integrity check, so the database itself is damaged: {problems[0]}{more}"
            )
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        # The copy keeps the source's WAL flag; a rollback-journal file stands alone, with no -wal or -shm
        # beside it, so it can be moved, mailed or opened read-only as one file. The bot turns WAL back on
        # when it opens a restored copy.
        db.execute("PRAGMA journal_mode = DELETE").fetchone()
        return version


def _flush(path: Path) -> None:
    """fsync a file, or a folder so that a rename in it is durable (folders cannot be opened on Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sidecars(path: Path) -> tuple[Path, ...]:
    return tuple(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))
