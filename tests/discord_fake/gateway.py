"""The gateway: HELLO, heartbeats, IDENTIFY → READY + GUILD_CREATE, RESUME with replay, forced disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from .records import GatewayFrame
from .world import INTENT_DIRECT_MESSAGES, INTENT_GUILD_MESSAGES

if TYPE_CHECKING:
    from .server import FakeDiscord

log = logging.getLogger(__name__)

DISPATCH = 0
HEARTBEAT = 1
IDENTIFY = 2
PRESENCE_UPDATE = 3
VOICE_STATE_UPDATE = 4
RESUME = 6
RECONNECT = 7
REQUEST_GUILD_MEMBERS = 8
INVALID_SESSION = 9
HELLO = 10
HEARTBEAT_ACK = 11

CLOSE_UNKNOWN_ERROR = 4000
CLOSE_AUTHENTICATION_FAILED = 4004


class GatewayConnection:
    """One websocket; frames are written one at a time."""

    def __init__(self, connection_id: int, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.id = connection_id
        self.ws = ws
        self.request = request
        self.session: GatewaySession | None = None
        self.closed = False
        self._lock = asyncio.Lock()

    async def send(self, text: str) -> bool:
        """Write one text frame; False when the socket is already gone (the frame stays for replay)."""
        if self.closed or self.ws.closed:
            return False
        async with self._lock:
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return False
        return True


@dataclasses.dataclass
class GatewaySession:
    """A logged-in session: its sequence, every dispatch sent (for RESUME replay) and its current socket."""

    id: str
    intents: int
    identify: dict[str, Any]
    seq: int = 0
    dispatched: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    connection: GatewayConnection | None = None
    resumes: int = 0
    invalidated: bool = False


class Gateway:
    """The gateway half of the fake; one current session receives dispatches."""

    def __init__(self, server: FakeDiscord, *, heartbeat_interval_ms: int) -> None:
        self._server = server
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.sessions: dict[str, GatewaySession] = {}
        self.current: GatewaySession | None = None
        self.connections: list[GatewayConnection] = []
        self.frames: list[GatewayFrame] = []
        self._connection_ids = itertools.count(1)

    @property
    def connected(self) -> bool:
        session = self.current
        return session is not None and session.connection is not None and not session.connection.closed

    # -- the websocket handler ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        connection = GatewayConnection(next(self._connection_ids), ws, request)
        self.connections.append(connection)
        try:
            await self._send(
                connection,
                {
                    "op": HELLO,
                    "d": {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake-gateway"]},
                },
            )
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    frame = json.loads(message.data)
                    self._record(connection, "in", frame)
                    await self._on_frame(connection, frame)
                elif message.type is WSMsgType.BINARY:
                    self._server._error(
                        f"gateway connection {connection.id} sent a binary frame; expected JSON text"
                    )
        except Exception as exc:
            log.exception("fake gateway: connection %s failed", connection.id)
            self._server._error(f"gateway connection {connection.id} failed: {exc!r}")
        finally:
            connection.closed = True
            session = connection.session
            if session is not None and session.connection is connection:
                session.connection = None
            self._server._notify()
        return ws

    async def _on_frame(self, connection: GatewayConnection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        data = frame.get("d")
        if op == HEARTBEAT:
            await self._send(connection, {"op": HEARTBEAT_ACK})
        elif op == IDENTIFY:
            await self._identify(connection, data or {})
        elif op == RESUME:
            await self._resume(connection, data or {})
        elif op == REQUEST_GUILD_MEMBERS:
            await self._request_members(connection, data or {})
        elif op in (PRESENCE_UPDATE, VOICE_STATE_UPDATE):
            pass  # recorded; nothing to answer
        else:
            self._server._error(f"gateway connection {connection.id} sent unknown op {op}: {frame}")

    async def _identify(self, connection: GatewayConnection, data: dict[str, Any]) -> None:
        if data.get("token") != self._server.token:
            await connection.ws.close(code=CLOSE_AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return
        world = self._server.world
        session = GatewaySession(
            id=secrets.token_hex(16), intents=int(data.get("intents") or 0), identify=data
        )
        self.sessions[session.id] = session
        if self.current is not None and self.current.connection is not None:
            log.warning("fake gateway: a new IDENTIFY replaces session %s", self.current.id)
        self.current = session
        session.connection = connection
        connection.session = session
        ready = {
            "v": 10,
            "user": {**world.bot_user.payload(), "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": str(guild.id), "unavailable": True} for guild in world.guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self._server.gateway_url,
            "application": {"id": str(world.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake"],
            "user_settings": {},
            "_trace": ["fake-gateway"],
        }
        if "shard" in data:
            ready["shard"] = data["shard"]
        await self._dispatch(session, "READY", ready)
        for guild in world.guilds:
            await self._dispatch(session, "GUILD_CREATE", guild.payload(joined_at=self._server.started_at))

    async def _resume(self, connection: GatewayConnection, data: dict[str, Any]) -> None:
        if data.get("token") != self._server.token:
            await connection.ws.close(code=CLOSE_AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return
        session = self.sessions.get(str(data.get("session_id")))
        if session is None or session.invalidated:
            await self._send(connection, {"op": INVALID_SESSION, "d": False})
            return
        previous = session.connection
        session.connection = None
        connection.session = session
        session.resumes += 1
        self.current = session
        if previous is not None and previous is not connection and not previous.closed:
            await previous.ws.close(code=CLOSE_UNKNOWN_ERROR)
        # Replay what the client missed, in order, before new dispatches reach this socket; dispatches made
        # during the replay are buffered and picked up by the next pass.
        sent = int(data.get("seq") or 0)
        while missed := [frame for frame in session.dispatched if frame["s"] > sent]:
            for frame in missed:
                await self._send(connection, frame)
                sent = frame["s"]
        session.connection = connection
        await self._dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})

    async def _request_members(self, connection: GatewayConnection, data: dict[str, Any]) -> None:
        session = connection.session
        if session is None:
            return
        guild = self._server.world.guild(int(data["guild_id"]))
        query = (data.get("query") or "").lower()
        wanted = {int(u) for u in data.get("user_ids") or []}
        members = [
            m
            for m in guild.members
            if (not wanted or m.user.id in wanted) and m.user.username.lower().startswith(query)
        ]
        limit = int(data.get("limit") or 0)
        if limit:
            members = members[:limit]
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": [m.payload() for m in members],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [str(u) for u in wanted if guild.member(u) is None],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        await self._dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)

    # -- sending -----------------------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> int:
        """Send a DISPATCH to the current session, or hold it for replay while the session is disconnected."""
        session = self.current
        if session is None:
            raise RuntimeError(f"cannot dispatch {event}: no client has identified with the fake gateway")
        return await self._dispatch(session, event, data)

    async def dispatch_message_event(self, event: str, data: dict[str, Any], *, guild_id: int | None) -> None:
        """MESSAGE_* events go only to a session whose intents ask for them."""
        session = self.current
        if session is None:
            return
        needed = INTENT_GUILD_MESSAGES if guild_id is not None else INTENT_DIRECT_MESSAGES
        if session.intents & needed:
            await self._dispatch(session, event, data)

    async def _dispatch(self, session: GatewaySession, event: str, data: dict[str, Any]) -> int:
        session.seq += 1
        frame = {"op": DISPATCH, "t": event, "s": session.seq, "d": data}
        session.dispatched.append(frame)
        connection = session.connection
        if connection is not None:
            await self._send(connection, frame)
        return session.seq

    async def _send(self, connection: GatewayConnection, frame: dict[str, Any]) -> None:
        frame = {"op": frame["op"], "d": frame.get("d"), "s": frame.get("s"), "t": frame.get("t")}
        if await connection.send(json.dumps(frame)):
            self._record(connection, "out", frame)

    def _record(self, connection: GatewayConnection, direction: str, frame: dict[str, Any]) -> None:
        self.frames.append(
            GatewayFrame(
                index=len(self.frames),
                at=self._server.clock.now(),
                connection=connection.id,
                direction=direction,
                op=int(frame.get("op", -1)),
                t=frame.get("t"),
                s=frame.get("s"),
                d=frame.get("d"),
            )
        )
        self._server._notify()

    # -- faults ------------------------------------------------------------------------------------

    def _current_connection(self) -> GatewayConnection:
        session = self.current
        if session is None or session.connection is None or session.connection.closed:
            raise RuntimeError("no client is connected to the fake gateway")
        return session.connection

    async def disconnect(self, code: int = CLOSE_UNKNOWN_ERROR) -> None:
        """Close the current socket with ``code``; 4000 (and most 4xxx) lets discord.py RESUME."""
        connection = self._current_connection()
        if connection.session is not None:
            connection.session.connection = None
        await connection.ws.close(code=code, message=b"fake gateway closed the connection")

    def drop(self) -> None:
        """Cut the TCP connection under the current socket without a close frame."""
        connection = self._current_connection()
        if connection.session is not None:
            connection.session.connection = None
        transport = connection.request.transport
        if transport is not None:
            transport.abort()

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: the client closes and resumes."""
        await self._send(self._current_connection(), {"op": RECONNECT, "d": None})

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION; without ``resumable`` the client must IDENTIFY again."""
        connection = self._current_connection()
        if not resumable and connection.session is not None:
            connection.session.invalidated = True
        await self._send(connection, {"op": INVALID_SESSION, "d": resumable})

    async def close_all(self) -> None:
        for connection in self.connections:
            if not connection.closed and not connection.ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        connection.ws.close(code=1001, message=b"fake Discord stopped"), 2.0
                    )
