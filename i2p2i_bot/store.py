"""The SQLite history and job store: one aiosqlite connection, numbered migrations, every query in one place.

Image files live beside the database, under `images_dir/<job id>/<index>.png`; the images table records them.
Uploaded sources, normalised, live under `sources_dir/<sha256>.png`; the interrogations and jobs made from
them refer to them by that hash.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.resources
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite
from PIL import Image

from i2p2i_bot.config import Settings
from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.guides import Guide, guides_from_json, guides_json
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.jobs import Delivery, Job, JobRequest, JobStatus
from i2p2i_bot.loras import Lora, loras_from_json, loras_json
from i2p2i_bot.request import GenerationRequest

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# SQLite allows 32766 bound variables; stay far below it in IN (...) lists.
_IN_CHUNK = 500
# SQLite's integers are signed 64-bit: no row has an id past these, and binding one raises OverflowError.
_ROW_IDS = range(-(2**63), 2**63)


class StoreError(Exception):
    """The database cannot be used by this version of the code (for example, a newer schema)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def packaged_migrations() -> tuple[Migration, ...]:
    """The numbered SQL files shipped in i2p2i_bot/migrations, in order."""
    folder = importlib.resources.files("i2p2i_bot").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


@dataclass(frozen=True, kw_only=True)
class JobChange:
    """A job's new state, written by the queue in the same transaction as the images that caused it.

    When it started is written once, as its first batch is handed out (Store.mark_running).
    """

    job_id: int
    status: JobStatus
    attempts: int
    in_flight: bool = False
    error: str | None = None
    finished_at: float | None = None


@dataclass(frozen=True, kw_only=True)
class StoredImage:
    job_id: int
    index: int
    seed: int
    nsfw: bool
    fidelity: float | None
    sha256: str
    created_at: float


@dataclass(frozen=True)
class JobRecord:
    """A job with the images stored for it so far: what /info shows and what a reroll starts from."""

    job: Job
    images: tuple[StoredImage, ...]


@dataclass(frozen=True)
class StoredInterrogation:
    """One member's interrogation request and its result (computed for them or served from the cache)."""

    id: int
    result_id: int
    user_id: int
    guild_id: int | None
    channel_id: int | None
    source_sha256: str
    cached: bool
    created_at: float
    interrogation: Interrogation


@dataclass(frozen=True, kw_only=True)
class UserStats:
    user_id: int
    jobs: dict[str, int] = field(default_factory=dict)
    images: int = 0
    interrogations: int = 0
    cache_hits: int = 0
    first_at: float | None = None
    last_at: float | None = None


@dataclass(frozen=True, kw_only=True)
class GlobalStats:
    users: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    images: int = 0
    interrogations: int = 0
    cache_hits: int = 0
    # Mean seconds from a job's start to its completion, over complete jobs.
    mean_job_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class CardChoices:
    """What a member chose on a prompt card; the defaults are the card as it was first posted."""

    # The applied negative suggestion; None leaves images to the server's negative prompt.
    negative_prompt: str | None = None
    # Whether the card lists every prompt it offers (after More prompts), not just the first.
    all_prompts: bool = False
    # The prompt the member wrote by replying to the card; None: the card's described prompt.
    prompt: str | None = None
    # Sampling settings for the card's images; None: the server's default when they are asked for.
    steps: int | None = None
    guidance: float | None = None
    aspect: str | None = None
    scheduler: str | None = None
    # What the card's images keep of its image besides the prompt, each guide with its weight; (): the
    # prompt only.
    keep: tuple[Guide, ...] = ()
    # The model preset the card was described for and makes its images with; None: the bot's default.
    preset: str | None = None

    @property
    def sampling(self) -> bool:
        """Whether the member chose any sampling setting."""
        return any(v is not None for v in (self.steps, self.guidance, self.aspect, self.scheduler))


@dataclass(frozen=True)
class PendingDescribe:
    """A describe a member waits on: its deferred answer, which the interaction's token may edit until
    ``expires_at``. Fields are in the table's column order."""

    interaction_id: int
    application_id: int
    token: str = field(repr=False)
    message_id: int | None
    user_id: int
    channel_id: int | None
    created_at: float
    expires_at: float
    # The language of its public placeholder (replies.channel_locale); None for English.
    locale: str | None = None


@dataclass(frozen=True, kw_only=True)
class ForgetResult:
    jobs: int
    images: int
    interrogations: int
    # Uploaded source files removed: those no other member's interrogation or job refers to.
    sources: int = 0


# PNG encoding is a batch's slowest step off the GPU (~85 ms for 512² on one core) and Pillow's encoder
# releases the GIL: a batch's images are encoded side by side, so the last batch's result waits for one
# image's encoding rather than all of them.
_PNG_THREADS = max(1, min(8, os.cpu_count() or 1))
_png_pool: concurrent.futures.ThreadPoolExecutor | None = None
_png_pool_lock = threading.Lock()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes_of(images: Sequence[Image.Image]) -> list[bytes]:
    """Each image as PNG bytes, in order: several at once on a shared pool of encoder threads. Blocking."""
    global _png_pool
    if len(images) < 2 or _PNG_THREADS < 2:
        return [_png_bytes(image) for image in images]
    with _png_pool_lock:
        if _png_pool is None:
            _png_pool = concurrent.futures.ThreadPoolExecutor(_PNG_THREADS, thread_name_prefix="i2p2i-png")
        pool = _png_pool
    return list(pool.map(_png_bytes, images))


class Store:
    """The job and history store. Open with `Store.open`; every method may be awaited from the event loop."""

    def __init__(
        self, db: aiosqlite.Connection, path: Path, images_dir: Path, sources_dir: Path | None = None
    ) -> None:
        self._db = db
        self.path = path
        self.images_dir = images_dir
        # None: this store keeps no source files (the command line's), so /forget has none to remove.
        self.sources_dir = sources_dir
        self._images_root = str(images_dir)
        # One connection carries every statement; the lock keeps each transaction's statements together.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        images_dir: str | Path,
        sources_dir: str | Path | None = None,
        busy_timeout_ms: int = 5000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        migrations: Sequence[Migration] | None = None,
    ) -> Store:
        """Connect, set the pragmas and apply any migrations the file has not seen, all in one transaction."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL (got {synchronous!r})")
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives any process crash; only a power cut can lose the last commits.
            await db.execute(f"PRAGMA synchronous = {synchronous}")
            await db.execute("PRAGMA foreign_keys = ON")
            # Freed space is zeroed, not just unlinked: the rows /forget deletes do not linger in the file's
            # free pages. Only /forget frees whole pages; elsewhere the zeroing touches pages being written
            # anyway.
            await db.execute("PRAGMA secure_delete = ON")
            store = cls(db, path, Path(images_dir), None if sources_dir is None else Path(sources_dir))
            await store._migrate(packaged_migrations() if migrations is None else migrations)
        except BaseException:
            await db.close()
            raise
        return store

    @classmethod
    async def from_settings(cls, settings: Settings) -> Store:
        return await cls.open(
            settings.database_path,
            images_dir=settings.data_path / "images",
            sources_dir=settings.sources_path,
            busy_timeout_ms=settings.store.busy_timeout_ms,
            synchronous=settings.store.synchronous,
        )

    async def close(self) -> None:
        """Close the connection; the last one out folds the WAL back into the database file."""
        async with self._lock:
            await self._db.close()

    async def _migrate(self, migrations: Sequence[Migration]) -> None:
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise StoreError(f"migrations must be numbered 1, 2, 3... without gaps (got {versions})")
        current = await self.schema_version()
        if current > len(migrations):
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this code knows ({len(migrations)})"
            )
        pending = [m for m in migrations if m.version > current]
        if not pending:
            return
        script = "\n".join(
            [
                "BEGIN IMMEDIATE;",
                *(m.sql for m in pending),
                f"PRAGMA user_version = {pending[-1].version};",
                "COMMIT;",
            ]
        )
        async with self._lock:
            try:
                await self._db.executescript(script)
            except BaseException:
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        rows = await self._fetchall("PRAGMA user_version")
        return int(rows[0][0])

    async def integrity_problems(self) -> list[str]:
        """What SQLite's own checks find wrong in the file (pages, indexes, foreign keys); empty if sound."""
        problems = [str(row[0]) for row in await self._fetchall("PRAGMA integrity_check") if row[0] != "ok"]
        for table, rowid, parent, _ in await self._fetchall("PRAGMA foreign_key_check"):
            problems.append(f"row {rowid} of {table} refers to a missing row of {parent}")
        return problems

    # -- plumbing -------------------------------------------------------------------------------------

    async def _fetchall(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[sqlite3.Row]:
        async with self._lock:
            return list(await self._db.execute_fetchall(query, params))

    async def _execute(self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        """Run one statement in its own transaction; return the number of rows it changed."""
        async with self._lock, self._db.execute(query, params) as cursor:
            return cursor.rowcount

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._begin() as db:
            yield db

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction; the caller holds the lock (and may keep it for work after the commit)."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("COMMIT")

    # -- jobs -----------------------------------------------------------------------------------------

    async def insert_job(self, submitted: JobRequest, now: float | None = None) -> Job:
        """Store a new queued job and return it."""
        (job,) = await self.insert_jobs([submitted], now)
        return job

    async def insert_jobs(self, entries: Sequence[JobRequest], now: float | None = None) -> list[Job]:
        """Store new queued jobs, in order, with one commit for all of them; return them with their ids."""
        now = time.time() if now is None else now
        for submitted in entries:
            if not submitted.request.planned:
                raise ValueError("a job's request must be planned (every setting and the seed fixed)")
        values = [_job_values(submitted, now) for submitted in entries]
        columns = ", ".join(_INSERTED_COLUMNS)
        marks = ", ".join("?" * len(_INSERTED_COLUMNS))
        if len(values) == 1:
            query = f"""INSERT INTO jobs ({columns}) VALUES ({marks}) RETURNING id"""
            ids = [row["id"] for row in await self._fetchall(query, values[0])]
        else:
            # One transaction with the ids chosen up front: RETURNING does not promise the rows' order, and
            # the write lock held by BEGIN IMMEDIATE keeps anyone else from taking these ids meanwhile.
            async with self._transaction() as db:
                query = """
                    SELECT MAX(
                        COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),
                        COALESCE((SELECT MAX(id) FROM jobs), 0)
                    ) AS last
                """
                last = next(iter(await db.execute_fetchall(query)))["last"]
                ids = list(range(last + 1, last + 1 + len(values)))
                query = f"""INSERT INTO jobs (id, {columns}) VALUES (?, {marks})"""
                await db.executemany(query, [(job_id, *row) for job_id, row in zip(ids, values, strict=True)])
        return [Job.queued(job_id, submitted, now) for job_id, submitted in zip(ids, entries, strict=True)]

    async def get_job(self, job_id: int) -> Job | None:
        if job_id not in _ROW_IDS:  # a number a member sent (a button's custom id, /job)
            return None
        query = """SELECT * FROM jobs WHERE id = ?"""
        rows = await self._fetchall(query, (job_id,))
        return _job_from_row(rows[0]) if rows else None

    async def job_by_request_key(self, request_key: str) -> Job | None:
        query = """SELECT * FROM jobs WHERE request_key = ?"""
        rows = await self._fetchall(query, (request_key,))
        return _job_from_row(rows[0]) if rows else None

    async def active_jobs(self) -> list[tuple[Job, bool]]:
        """Queued and running jobs in the order they were submitted, each with its in-flight flag."""
        query = """SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY id"""
        rows = await self._fetchall(query)
        return [(_job_from_row(row), bool(row["in_flight"])) for row in rows]

    async def stored_indices(self, job_ids: Iterable[int]) -> dict[int, set[int]]:
        """For each job, the indices of the images already stored."""
        found: dict[int, set[int]] = {}
        ids = list(job_ids)
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            query = f"""SELECT job_id, image_index FROM images WHERE job_id IN ({marks})"""
            for row in await self._fetchall(query, chunk):
                found.setdefault(row["job_id"], set()).add(row["image_index"])
        return found

    async def save_changes(self, changes: Sequence[JobChange], images: Sequence[StoredImage] = ()) -> None:
        """Record new images and job states in one transaction.

        A job that is already final (cancelled, say) keeps its state: the update only touches active jobs.
        """
        if not changes and not images:
            return
        async with self._transaction() as db:
            if images:
                query = """
                    INSERT INTO images (job_id, image_index, seed, nsfw, fidelity, sha256, created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?)
                """
                await db.executemany(
                    query,
                    [
                        (i.job_id, i.index, i.seed, int(i.nsfw), i.fidelity, i.sha256, i.created_at)
                        for i in images
                    ],
                )
            if changes:
                query = """
                    UPDATE jobs
                    SET status = ?, attempts = ?, in_flight = ?, error = ?, finished_at = ?
                    WHERE id = ? AND status IN ('queued', 'running')
                """
                await db.executemany(
                    query,
                    [
                        (
                            c.status.value,
                            c.attempts,
                            int(c.in_flight),
                            c.error,
                            c.finished_at,
                            c.job_id,
                        )
                        for c in changes
                    ],
                )

    async def mark_running(self, job_ids: Sequence[int], now: float) -> None:
        """Mark jobs as running with images on the GPU, in one statement (so one commit)."""
        for start in range(0, len(job_ids), _IN_CHUNK):
            chunk = list(job_ids[start : start + _IN_CHUNK])
            marks = ", ".join("?" * len(chunk))
            query = f"""
                UPDATE jobs
                SET status = 'running', in_flight = 1, started_at = COALESCE(started_at, ?)
                WHERE id IN ({marks}) AND status IN ('queued', 'running')
            """
            await self._execute(query, [now, *chunk])

    async def set_delivery(self, job_id: int, delivery: Delivery) -> None:
        """Remember where a job's results go (the bot's status message, a fresh interaction token...)."""
        query = """
            UPDATE jobs
            SET delivery_channel_id = ?, delivery_message_id = ?, interaction_token = ?,
                interaction_expires_at = ?
            WHERE id = ?
        """
        await self._execute(
            query,
            (
                delivery.channel_id,
                delivery.message_id,
                delivery.interaction_token,
                delivery.token_expires_at,
                job_id,
            ),
        )

    async def mark_delivered(self, job_id: int, now: float | None = None) -> None:
        """The job's final message was sent; the interaction token is no longer needed, so it is dropped."""
        query = """
            UPDATE jobs SET delivered_at = ?, interaction_token = NULL, delivery_error = NULL WHERE id = ?
        """
        await self._execute(query, (time.time() if now is None else now, job_id))

    async def mark_undeliverable(self, job_id: int, reason: str) -> None:
        """Every way to post the job's result failed; keep why, for its owner, until it is delivered."""
        await self._execute("UPDATE jobs SET delivery_error = ? WHERE id = ?", (reason, job_id))

    async def undelivered_jobs(self, limit: int = 100) -> list[Job]:
        """Final jobs whose result was never sent (the bot was down, or stopped right after they finished),
        unless Delete hid them meanwhile."""
        query = """
            SELECT * FROM jobs
            WHERE delivered_at IS NULL AND status IN ('complete', 'failed', 'cancelled')
                AND hidden_at IS NULL
            ORDER BY id LIMIT ?
        """
        return [_job_from_row(row) for row in await self._fetchall(query, (limit,))]

    # -- image files ----------------------------------------------------------------------------------

    def image_path(self, job_id: int, index: int) -> Path:
        return Path(self.image_file(job_id, index))

    def image_file(self, job_id: int, index: int) -> str:
        """The PNG's path as a string (cheaper than a Path where many are made)."""
        return f"{self._images_root}{os.sep}{job_id}{os.sep}{index}.png"

    def write_image_files(self, images: Sequence[tuple[int, int, Image.Image]]) -> list[str]:
        """Write (job id, index, image) as PNG files and return their sha256s. Blocking: run it off the loop.

        Each file is written under a temporary name and renamed, so a kill never leaves half a PNG.
        """
        hashes = []
        made: set[int] = set()
        suffix = f".{os.getpid()}.tmp"
        encoded = png_bytes_of([image for _, _, image in images])
        for (job_id, index, _), data in zip(images, encoded, strict=True):
            folder = f"{self._images_root}{os.sep}{job_id}"
            if job_id not in made:
                try:
                    os.mkdir(folder)
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    os.makedirs(folder, exist_ok=True)
                made.add(job_id)
            temp = f"{folder}{os.sep}.{index}.png{suffix}"
            with open(temp, "wb") as file:
                file.write(data)
            os.replace(temp, f"{folder}{os.sep}{index}.png")
            hashes.append(hashlib.sha256(data).hexdigest())
        return hashes

    def remove_image_files(self, keys: Iterable[tuple[int, int]]) -> None:
        """Delete the files of images that were made but will not be recorded. Blocking."""
        for job_id, index in keys:
            path = self.image_path(job_id, index)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder of a job with no image left (or still in use)
                path.parent.rmdir()

    def remove_temp_files(self, job_ids: Iterable[int]) -> None:
        """Delete half-written files a killed process left in these jobs' folders. Blocking."""
        for job_id in job_ids:
            folder = self.images_dir / str(job_id)
            if folder.is_dir():
                for temp in folder.glob(".*.tmp"):
                    temp.unlink(missing_ok=True)

    # -- interrogations -------------------------------------------------------------------------------

    async def find_interrogation(
        self, source_sha256: str, mode: str, models: Mapping[str, str]
    ) -> tuple[int, Interrogation] | None:
        """The cached result for these image bytes, mode and models, with its result id, if there is one."""
        query = """SELECT * FROM interrogation_results WHERE source_sha256 = ? AND mode = ? AND models = ?"""
        rows = await self._fetchall(query, (source_sha256, mode, _models_key(models)))
        return (rows[0]["id"], _interrogation_from_row(rows[0])) if rows else None

    async def add_interrogation(
        self,
        interrogation: Interrogation,
        *,
        source_sha256: str,
        user_id: int,
        models: Mapping[str, str] | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        now: float | None = None,
    ) -> StoredInterrogation:
        """Store a freshly computed result (once per key) and this member's request for it."""
        now = time.time() if now is None else now
        models_key = _models_key(interrogation.models if models is None else models)
        async with self._transaction() as db:
            result_id = await self._insert_result(db, interrogation, source_sha256, models_key, now)
            request_id = await self._insert_request(db, result_id, user_id, guild_id, channel_id, False, now)
        return StoredInterrogation(
            request_id, result_id, user_id, guild_id, channel_id, source_sha256, False, now, interrogation
        )

    async def add_result(
        self,
        interrogation: Interrogation,
        *,
        source_sha256: str,
        models: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> int:
        """Store a freshly computed result (once per key) that no member asked for as a card of its own;
        its id. /forget drops it with the other results nobody asked for."""
        now = time.time() if now is None else now
        models_key = _models_key(interrogation.models if models is None else models)
        async with self._transaction() as db:
            return await self._insert_result(db, interrogation, source_sha256, models_key, now)

    @staticmethod
    async def _insert_result(
        db: aiosqlite.Connection,
        interrogation: Interrogation,
        source_sha256: str,
        models_key: str,
        now: float,
    ) -> int:
        query = """
            INSERT INTO interrogation_results (
                source_sha256, mode, models, prompt, score, caption, negative, candidates,
                image_embedding, timings, created_at
            ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (source_sha256, mode, models) DO NOTHING
        """
        await db.execute(
            query,
            (
                source_sha256,
                interrogation.mode,
                models_key,
                interrogation.prompt,
                interrogation.score,
                interrogation.caption,
                interrogation.negative,
                json.dumps([[c.mode, c.prompt, c.score] for c in interrogation.candidates]),
                _embedding_blob(interrogation.image_embedding),
                json.dumps(interrogation.timings_s),
                now,
            ),
        )
        query = """SELECT id FROM interrogation_results WHERE source_sha256 = ? AND mode = ? AND models = ?"""
        rows = await db.execute_fetchall(query, (source_sha256, interrogation.mode, models_key))
        return int(next(iter(rows))["id"])

    async def add_cache_hit(
        self,
        result_id: int,
        interrogation: Interrogation,
        *,
        source_sha256: str,
        user_id: int,
        guild_id: int | None = None,
        channel_id: int | None = None,
        now: float | None = None,
    ) -> StoredInterrogation:
        """Record a member's request that was answered from the cache."""
        now = time.time() if now is None else now
        async with self._transaction() as db:
            request_id = await self._insert_request(db, result_id, user_id, guild_id, channel_id, True, now)
        return StoredInterrogation(
            request_id, result_id, user_id, guild_id, channel_id, source_sha256, True, now, interrogation
        )

    @staticmethod
    async def _insert_request(
        db: aiosqlite.Connection,
        result_id: int,
        user_id: int,
        guild_id: int | None,
        channel_id: int | None,
        cached: bool,
        now: float,
    ) -> int:
        query = """
            INSERT INTO interrogations (result_id, user_id, guild_id, channel_id, cached, created_at)
            VALUES (?, ?, ?, ?, ?, ?)
            RETURNING id
        """
        rows = await db.execute_fetchall(query, (result_id, user_id, guild_id, channel_id, int(cached), now))
        return int(next(iter(rows))["id"])

    async def get_interrogation(self, interrogation_id: int) -> StoredInterrogation | None:
        if interrogation_id not in _ROW_IDS:  # a number a member sent (a card button's custom id)
            return None
        query = """
            SELECT i.id AS request_id, i.user_id, i.guild_id, i.channel_id, i.cached,
                   i.created_at AS requested_at, r.*
            FROM interrogations AS i JOIN interrogation_results AS r ON r.id = i.result_id
            WHERE i.id = ?
        """
        rows = await self._fetchall(query, (interrogation_id,))
        return _stored_interrogation_from_row(rows[0]) if rows else None

    async def interrogation_embedding(self, interrogation_id: int) -> tuple[float, ...] | None:
        """The source image's CLIP embedding for an interrogation request, or None if it is gone."""
        query = """
            SELECT r.image_embedding
            FROM interrogations AS i JOIN interrogation_results AS r ON r.id = i.result_id
            WHERE i.id = ?
        """
        rows = await self._fetchall(query, (interrogation_id,))
        return _embedding_from_blob(rows[0]["image_embedding"]) if rows else None

    # -- cards ----------------------------------------------------------------------------------------

    async def card_choices(self, card_id: int) -> CardChoices:
        """What the member chose on a card (an interrogation request); the defaults where nothing yet."""
        query = """
            SELECT negative_prompt, all_prompts, prompt, steps, guidance, aspect, scheduler, keep, preset
            FROM cards WHERE interrogation_id = ?
        """
        rows = await self._fetchall(query, (card_id,))
        if not rows:
            return CardChoices()
        row = rows[0]
        return CardChoices(
            negative_prompt=row["negative_prompt"],
            all_prompts=bool(row["all_prompts"]),
            prompt=row["prompt"],
            steps=row["steps"],
            guidance=row["guidance"],
            aspect=row["aspect"],
            scheduler=row["scheduler"],
            keep=_keep_field(row["keep"]),
            preset=row["preset"],
        )

    async def set_card_sampling(
        self,
        card_id: int,
        *,
        steps: int | None,
        guidance: float | None,
        aspect: str | None,
        scheduler: str | None,
        now: float | None = None,
    ) -> None:
        """The sampling settings a member chose for a card's images (None: the server's default)."""
        await self._set_card(card_id, now, steps=steps, guidance=guidance, aspect=aspect, scheduler=scheduler)

    async def carry_card_choices(self, card_id: int, choices: CardChoices, now: float | None = None) -> None:
        """Give a new card of the same image what the member chose on the old one: its applied negative
        prompt, sampling settings and guides (its prompt and prompt list are the new description's)."""
        await self._set_card(
            card_id,
            now,
            negative_prompt=choices.negative_prompt,
            steps=choices.steps,
            guidance=choices.guidance,
            aspect=choices.aspect,
            scheduler=choices.scheduler,
            keep=_keep_column(choices.keep),
        )

    async def set_card_preset(self, card_id: int, preset: str | None, now: float | None = None) -> None:
        """The model preset a card was described for, which its images are made with (None: the default)."""
        await self._set_card(card_id, now, preset=preset)

    async def set_card_keep(self, card_id: int, keep: Sequence[Guide], now: float | None = None) -> None:
        """What a card's images keep of its image besides the prompt, each guide with its weight."""
        await self._set_card(card_id, now, keep=_keep_column(tuple(keep)))

    async def set_card_negative(
        self, card_id: int, negative_prompt: str | None, now: float | None = None
    ) -> None:
        """Apply a negative prompt to a card's images, or (None) leave them to the server's default."""
        await self._set_card(card_id, now, negative_prompt=negative_prompt)

    async def set_card_prompt(self, card_id: int, prompt: str | None, now: float | None = None) -> None:
        """The prompt a member wrote for a card's images, or (None) the card's described prompt again."""
        await self._set_card(card_id, now, prompt=prompt)

    async def show_all_card_prompts(self, card_id: int, now: float | None = None) -> None:
        """Make a card list every prompt it offers from now on."""
        await self._set_card(card_id, now, all_prompts=1)

    async def _set_card(self, card_id: int, now: float | None, **columns: object) -> None:
        """Set these columns of a card's row (made if it has none), and when it changed. The column names
        come from this module, never from a member."""
        names = [*columns, "updated_at"]
        values = [*columns.values(), time.time() if now is None else now]
        query = f"""
            INSERT INTO cards (interrogation_id, {", ".join(names)}) VALUES (?{", ?" * len(names)})
            ON CONFLICT (interrogation_id) DO UPDATE SET
                {", ".join(f"{name} = excluded.{name}" for name in names)}
        """
        await self._execute(query, (card_id, *values))

    # -- servers --------------------------------------------------------------------------------------

    async def server_settings(self) -> list[tuple[int, str]]:
        """Every server's changed settings, as (guild id, JSON)."""
        query = """SELECT guild_id, settings FROM server_settings ORDER BY guild_id"""
        return [(row["guild_id"], row["settings"]) for row in await self._fetchall(query)]

    async def put_server_settings(
        self, guild_id: int, settings: str | None, *, updated_by: int, updated_at: float
    ) -> None:
        """Store a server's changed settings as JSON; None: it has the config file's again."""
        if settings is None:
            await self._execute("""DELETE FROM server_settings WHERE guild_id = ?""", (guild_id,))
            return
        query = """
            INSERT INTO server_settings (guild_id, settings, updated_by, updated_at) VALUES (?, ?, ?, ?)
            ON CONFLICT (guild_id) DO UPDATE SET
                settings = excluded.settings,
                updated_by = excluded.updated_by,
                updated_at = excluded.updated_at
        """
        await self._execute(query, (guild_id, settings, updated_by, updated_at))

    # -- describes in progress ------------------------------------------------------------------------

    async def add_pending_describe(self, pending: PendingDescribe) -> None:
        """Remember a deferred describe until it is answered (remove_pending_describe)."""
        query = """
            INSERT OR REPLACE INTO pending_describes (
                interaction_id, application_id, token, message_id, user_id, channel_id, created_at,
                expires_at, locale
            ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
        """
        await self._execute(query, dataclasses.astuple(pending))

    async def remove_pending_describe(self, interaction_id: int) -> None:
        query = """DELETE FROM pending_describes WHERE interaction_id = ?"""
        await self._execute(query, (interaction_id,))

    async def pending_describes(self) -> list[PendingDescribe]:
        """Every describe deferred and not yet answered, oldest first."""
        query = """SELECT * FROM pending_describes ORDER BY created_at, interaction_id"""
        return [
            PendingDescribe(**{f.name: row[f.name] for f in dataclasses.fields(PendingDescribe)})
            for row in await self._fetchall(query)
        ]

    # -- history --------------------------------------------------------------------------------------

    async def recent_jobs(self, owner_id: int, limit: int = 10, *, include_hidden: bool = False) -> list[Job]:
        """A member's latest jobs, newest first; those Delete hid only when asked for (an admin's view)."""
        query = """
            SELECT * FROM jobs WHERE owner_id = ? AND (? OR hidden_at IS NULL) ORDER BY id DESC LIMIT ?
        """
        rows = await self._fetchall(query, (owner_id, include_hidden, limit))
        return [_job_from_row(row) for row in rows]

    async def recent_interrogations(self, user_id: int, limit: int = 10) -> list[StoredInterrogation]:
        query = """
            SELECT i.id AS request_id, i.user_id, i.guild_id, i.channel_id, i.cached,
                   i.created_at AS requested_at, r.*
            FROM interrogations AS i JOIN interrogation_results AS r ON r.id = i.result_id
            WHERE i.user_id = ?
            ORDER BY i.id DESC LIMIT ?
        """
        return [_stored_interrogation_from_row(row) for row in await self._fetchall(query, (user_id, limit))]

    async def search_jobs(
        self, text: str, *, owner_id: int | None = None, limit: int = 10, include_hidden: bool = False
    ) -> list[Job]:
        """Jobs whose prompt contains the text (case-insensitive for ASCII), newest first; those Delete hid
        only when asked for."""
        query = """
            SELECT * FROM jobs
            WHERE prompt LIKE ? ESCAPE '\\' AND (? IS NULL OR owner_id = ?) AND (? OR hidden_at IS NULL)
            ORDER BY id DESC LIMIT ?
        """
        params = (_like_pattern(text), owner_id, owner_id, include_hidden, limit)
        rows = await self._fetchall(query, params)
        return [_job_from_row(row) for row in rows]

    async def search_interrogations(
        self, text: str, *, user_id: int | None = None, limit: int = 10
    ) -> list[StoredInterrogation]:
        """Interrogations whose prompt contains the text, newest first."""
        query = """
            SELECT i.id AS request_id, i.user_id, i.guild_id, i.channel_id, i.cached,
                   i.created_at AS requested_at, r.*
            FROM interrogations AS i JOIN interrogation_results AS r ON r.id = i.result_id
            WHERE r.prompt LIKE ? ESCAPE '\\' AND (? IS NULL OR i.user_id = ?)
            ORDER BY i.id DESC LIMIT ?
        """
        rows = await self._fetchall(query, (_like_pattern(text), user_id, user_id, limit))
        return [_stored_interrogation_from_row(row) for row in rows]

    async def hide_job(self, job_id: int, *, by: int, now: float | None = None) -> Job | None:
        """Hide a finished job from everyone but admins and remove its image files; the job as it now is.

        Hiding twice changes nothing: the first time and who did it are kept. The row and its images' rows
        stay (prompt, settings, seeds, hashes), for admins, until the owner's /forget. An unfinished job
        is left as it is.
        """
        query = """
            UPDATE jobs SET hidden_at = ?, hidden_by = ?
            WHERE id = ? AND hidden_at IS NULL AND status IN ('complete', 'failed', 'cancelled')
        """
        await self._execute(query, (time.time() if now is None else now, by, job_id))
        job = await self.get_job(job_id)
        if job is not None and job.hidden_at is not None:
            await asyncio.to_thread(self._remove_job_folders, [job_id])
        return job

    async def job_record(self, job_id: int) -> JobRecord | None:
        job = await self.get_job(job_id)
        if job is None:
            return None
        query = """SELECT * FROM images WHERE job_id = ? ORDER BY image_index"""
        images = tuple(_image_from_row(row) for row in await self._fetchall(query, (job_id,)))
        return JobRecord(job, images)

    async def user_stats(self, user_id: int) -> UserStats:
        query = """SELECT status, COUNT(*) AS n FROM jobs WHERE owner_id = ? GROUP BY status"""
        jobs = {row["status"]: row["n"] for row in await self._fetchall(query, (user_id,))}
        query = """
            SELECT
                (SELECT COUNT(*) FROM images AS im JOIN jobs AS j ON j.id = im.job_id
                    WHERE j.owner_id = :user) AS images,
                (SELECT COUNT(*) FROM interrogations WHERE user_id = :user) AS interrogations,
                (SELECT COUNT(*) FROM interrogations WHERE user_id = :user AND cached = 1) AS cache_hits,
                (SELECT MIN(t) FROM (
                    SELECT MIN(created_at) AS t FROM jobs WHERE owner_id = :user
                    UNION ALL SELECT MIN(created_at) FROM interrogations WHERE user_id = :user)) AS first_at,
                (SELECT MAX(t) FROM (
                    SELECT MAX(created_at) AS t FROM jobs WHERE owner_id = :user
                    UNION ALL SELECT MAX(created_at) FROM interrogations WHERE user_id = :user)) AS last_at
        """
        (row,) = await self._fetchall(query, {"user": user_id})
        return UserStats(
            user_id=user_id,
            jobs=jobs,
            images=row["images"],
            interrogations=row["interrogations"],
            cache_hits=row["cache_hits"],
            first_at=row["first_at"],
            last_at=row["last_at"],
        )

    async def global_stats(self) -> GlobalStats:
        query = """SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"""
        jobs = {row["status"]: row["n"] for row in await self._fetchall(query)}
        query = """
            SELECT
                (SELECT COUNT(*) FROM (
                    SELECT owner_id FROM jobs UNION SELECT user_id FROM interrogations)) AS users,
                (SELECT COUNT(*) FROM images) AS images,
                (SELECT COUNT(*) FROM interrogations) AS interrogations,
                (SELECT COUNT(*) FROM interrogations WHERE cached = 1) AS cache_hits,
                (SELECT AVG(finished_at - started_at) FROM jobs WHERE status = 'complete') AS mean_job_s
        """
        (row,) = await self._fetchall(query)
        return GlobalStats(
            users=row["users"],
            jobs=jobs,
            images=row["images"],
            interrogations=row["interrogations"],
            cache_hits=row["cache_hits"],
            mean_job_s=row["mean_job_s"],
        )

    async def forget_user(self, user_id: int) -> ForgetResult:
        """Delete one member's jobs, images (rows and files), interrogations and uploaded sources.

        Cached results nobody else asked for go too, and so does each source file no other member's
        interrogation or job refers to. Call it through JobQueue.forget, which first takes the member's
        active jobs off the queue, so no batch writes into a job that no longer exists.
        """
        async with self._lock:
            async with self._begin() as db:
                query = """SELECT id FROM jobs WHERE owner_id = ?"""
                job_ids = [row["id"] for row in await db.execute_fetchall(query, (user_id,))]
                query = """
                    SELECT COUNT(*) AS n FROM images WHERE job_id IN (SELECT id FROM jobs WHERE owner_id = ?)
                """
                images = next(iter(await db.execute_fetchall(query, (user_id,))))["n"]
                # Chosen before the rows that name them go; nobody else's rows change meanwhile.
                query = """
                    WITH mine (sha) AS (
                        SELECT r.source_sha256
                        FROM interrogations AS i JOIN interrogation_results AS r ON r.id = i.result_id
                        WHERE i.user_id = :user
                        UNION
                        SELECT source_sha256 FROM jobs WHERE owner_id = :user AND source_sha256 IS NOT NULL
                        UNION
                        SELECT guide_source FROM jobs WHERE owner_id = :user AND guide_source IS NOT NULL
                    )
                    SELECT sha FROM mine
                    WHERE NOT EXISTS (
                        SELECT 1
                        FROM interrogation_results AS r JOIN interrogations AS i ON i.result_id = r.id
                        WHERE r.source_sha256 = mine.sha AND i.user_id != :user
                    )
                    AND NOT EXISTS (
                        SELECT 1 FROM jobs WHERE source_sha256 = mine.sha AND owner_id != :user
                    )
                    AND NOT EXISTS (
                        SELECT 1 FROM jobs WHERE guide_source = mine.sha AND owner_id != :user
                    )
                """
                sources = [row["sha"] for row in await db.execute_fetchall(query, {"user": user_id})]
                query = """DELETE FROM jobs WHERE owner_id = ?"""
                await db.execute(query, (user_id,))
                query = """DELETE FROM pending_describes WHERE user_id = ?"""
                await db.execute(query, (user_id,))
                query = """DELETE FROM interrogations WHERE user_id = ?"""
                async with db.execute(query, (user_id,)) as cursor:
                    interrogations = cursor.rowcount
                query = """
                    DELETE FROM interrogation_results
                    WHERE NOT EXISTS (
                        SELECT 1 FROM interrogations AS i WHERE i.result_id = interrogation_results.id
                    )
                """
                await db.execute(query)
            # Still under the lock: no one can record a new interrogation of these images between the
            # choice above and the files' removal.
            removed = await asyncio.to_thread(self._remove_sources, sources)
            # Copy the overwritten pages into the file and empty the write-ahead log, whose older frames
            # still hold the deleted rows. A reader in another process (a backup) holds the log back for
            # up to busy_timeout_ms; past that, a later checkpoint finishes the job.
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await asyncio.to_thread(self._remove_job_folders, job_ids)
        return ForgetResult(jobs=len(job_ids), images=images, interrogations=interrogations, sources=removed)

    def source_path(self, sha256: str) -> Path | None:
        """Where the normalised upload with this hash is kept; None when this store keeps no sources."""
        return None if self.sources_dir is None else self.sources_dir / f"{sha256}.png"

    def _remove_sources(self, hashes: Iterable[str]) -> int:
        removed = 0
        for sha256 in hashes:
            path = self.source_path(sha256)
            if path is not None and path.exists():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _remove_job_folders(self, job_ids: Iterable[int]) -> None:
        for job_id in job_ids:
            shutil.rmtree(self.images_dir / str(job_id), ignore_errors=True)


# -- row mapping --------------------------------------------------------------------------------------


# A job's request fields, and the fields of who submitted it and where it stands, are columns of the same
# names; its delivery's fields have columns of their own names. `seeds` spells out the request's seeds for
# readers of the file.
_REQUEST_COLUMNS = tuple(f.name for f in dataclasses.fields(GenerationRequest))


def _keep_column(guides: tuple[Guide, ...]) -> str:
    return json.dumps(guides_json(guides))


def _keep_field(text: str) -> tuple[Guide, ...]:
    return guides_from_json(json.loads(text))


def _loras_column(loras: tuple[Lora, ...]) -> str:
    return json.dumps(loras_json(loras))


def _loras_field(text: str) -> tuple[Lora, ...]:
    return loras_from_json(json.loads(text))


# Request fields that are no plain value, with how their column holds them: (to the column, from it).
_REQUEST_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "keep": (_keep_column, _keep_field),
    "loras": (_loras_column, _loras_field),
    "upscale": (int, bool),
}
_PLAIN = (lambda value: value, lambda value: value)
_REQUEST_CODING = tuple((name, *_REQUEST_CODECS.get(name, _PLAIN)) for name in _REQUEST_COLUMNS)
_SUBMISSION_COLUMNS = tuple(
    f.name for f in dataclasses.fields(JobRequest) if f.name not in ("request", "delivery")
)
_STATE_COLUMNS = tuple(
    f.name for f in dataclasses.fields(Job) if f.name not in {g.name for g in dataclasses.fields(JobRequest)}
)
_DELIVERY_COLUMNS = {
    "channel_id": "delivery_channel_id",
    "message_id": "delivery_message_id",
    "interaction_token": "interaction_token",
    "token_expires_at": "interaction_expires_at",
}
_INSERTED_COLUMNS = (
    *_SUBMISSION_COLUMNS,
    *_REQUEST_COLUMNS,
    *_DELIVERY_COLUMNS.values(),
    "seeds",
    "status",
    "created_at",
)


def _job_from_row(row: sqlite3.Row) -> Job:
    state = {name: row[name] for name in _STATE_COLUMNS}
    state["status"] = JobStatus(state["status"])
    submission = {name: row[name] for name in _SUBMISSION_COLUMNS}
    submission["flagged_policy"] = FlaggedPolicy(submission["flagged_policy"])
    return Job(
        request=GenerationRequest(**{name: decode(row[name]) for name, _, decode in _REQUEST_CODING}),
        delivery=Delivery(**{name: row[column] for name, column in _DELIVERY_COLUMNS.items()}),
        **submission,
        **state,
    )


def _job_values(submitted: JobRequest, now: float) -> tuple[Any, ...]:
    request, delivery = submitted.request, submitted.delivery
    return (
        *(getattr(submitted, name) for name in _SUBMISSION_COLUMNS),
        *(encode(getattr(request, name)) for name, encode, _ in _REQUEST_CODING),
        *(getattr(delivery, name) for name in _DELIVERY_COLUMNS),
        json.dumps(list(request.seeds)),
        JobStatus.QUEUED.value,
        now,
    )


def _image_from_row(row: sqlite3.Row) -> StoredImage:
    return StoredImage(
        job_id=row["job_id"],
        index=row["image_index"],
        seed=row["seed"],
        nsfw=bool(row["nsfw"]),
        fidelity=row["fidelity"],
        sha256=row["sha256"],
        created_at=row["created_at"],
    )


def _interrogation_from_row(row: sqlite3.Row) -> Interrogation:
    return Interrogation(
        mode=row["mode"],
        prompt=row["prompt"],
        score=row["score"],
        caption=row["caption"],
        negative=row["negative"],
        candidates=tuple(
            Candidate(mode, prompt, score) for mode, prompt, score in json.loads(row["candidates"])
        ),
        image_embedding=_embedding_from_blob(row["image_embedding"]),
        models=json.loads(row["models"]),
        timings_s=json.loads(row["timings"]),
    )


def _stored_interrogation_from_row(row: sqlite3.Row) -> StoredInterrogation:
    return StoredInterrogation(
        id=row["request_id"],
        result_id=row["id"],
        user_id=row["user_id"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        source_sha256=row["source_sha256"],
        cached=bool(row["cached"]),
        created_at=row["requested_at"],
        interrogation=_interrogation_from_row(row),
    )


def _models_key(models: Mapping[str, str]) -> str:
    return json.dumps(dict(models), sort_keys=True, separators=(",", ":"))


def _embedding_blob(values: Sequence[float]) -> bytes:
    floats = array("f", values)
    if sys.byteorder == "big":
        floats.byteswap()
    return floats.tobytes()


def _embedding_from_blob(blob: bytes) -> tuple[float, ...]:
    floats = array("f")
    floats.frombytes(blob)
    if sys.byteorder == "big":
        floats.byteswap()
    return tuple(floats)


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
