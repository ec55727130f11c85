"""Discord's error answers, a clock the test controls, and faults a test arms for the next N calls."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any, Literal

from .records import RecordedCall

# JSON error codes, as Discord documents them.
UNKNOWN_CHANNEL = 10003
UNKNOWN_GUILD = 10004
UNKNOWN_MEMBER = 10007
UNKNOWN_MESSAGE = 10008
UNKNOWN_USER = 10013
UNKNOWN_WEBHOOK = 10015
UNKNOWN_INTERACTION = 10062
REQUEST_TOO_LARGE = 40005
ALREADY_ACKNOWLEDGED = 40060
MISSING_ACCESS = 50001
CANNOT_EDIT_OTHERS_MESSAGE = 50005
CANNOT_DM_USER = 50007
MISSING_PERMISSIONS = 50013
INVALID_WEBHOOK_TOKEN = 50027
INVALID_FORM_BODY = 50035

_DEFAULT_MESSAGES = {
    400: "400: Bad Request",
    401: "401: Unauthorized",
    403: "403: Forbidden",
    404: "404: Not Found",
    405: "405: Method Not Allowed",
    413: "Request entity too large",
    429: "You are being rate limited.",
    500: "500: Internal Server Error",
    502: "502: Bad Gateway",
    503: "503: Service Unavailable",
    504: "504: Gateway Timeout",
}

RateLimitScope = Literal["user", "global", "shared"]
# When a cut fault closes the connection: before the fake applies the request, or after (the answer is lost).
CutMoment = Literal["before", "after"]


class ApiError(Exception):
    """An error answer: raising it from a route handler sends ``{"code", "message"[, "errors"]}``."""

    def __init__(self, status: int, code: int = 0, message: str | None = None, errors: Any = None) -> None:
        self.status = status
        self.code = code
        self.message = message or _DEFAULT_MESSAGES.get(status, f"{status}")
        self.errors = errors
        super().__init__(f"{status} {self.code} {self.message}")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def invalid_form_body(field: str, code: str, message: str) -> ApiError:
    """A 400 50035 whose ``errors`` point at one field, shaped like Discord's nested error object."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(field.split(".")):
        errors = {part: errors}
    return ApiError(400, INVALID_FORM_BODY, "Invalid Form Body", errors)


class FakeClock:
    """Wall time plus an offset the test moves forward; decides token expiry and the 3 s ack deadline."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def now(self) -> float:
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the fake clock only moves forward")
        self.offset_s += seconds


@dataclasses.dataclass
class Fault:
    """An armed fault: the next ``remaining`` calls matching ``route`` (and ``where``) get this answer."""

    name: str
    route: str | None
    status: int
    body: dict[str, Any] | str | None
    headers: dict[str, str]
    remaining: int
    where: Callable[[RecordedCall], bool] | None = None
    hits: list[RecordedCall] = dataclasses.field(default_factory=list)
    # Close the connection instead of answering ``status``/``body`` (see FaultPlan.cut).
    cut: CutMoment | None = None
    # Hold the request until ``release()``, then answer it normally (see FaultPlan.hold).
    gate: asyncio.Event | None = None

    def release(self) -> None:
        """Let held requests (and any later ones this fault catches) through."""
        if self.gate is not None:
            self.gate.set()

    def matches(self, call: RecordedCall) -> bool:
        if self.remaining <= 0:
            return False
        if self.route is not None and call.route != self.route:
            return False
        return self.where is None or self.where(call)


class FaultPlan:
    """The faults armed for the coming calls, consumed first-armed first."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    @property
    def pending(self) -> list[Fault]:
        return [fault for fault in self._faults if fault.remaining > 0]

    def clear(self) -> None:
        self._faults.clear()

    def fail(
        self,
        route: str | None,
        *,
        status: int = 500,
        times: int = 1,
        code: int = 0,
        message: str | None = None,
        where: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Answer ``status`` with a Discord error body (``code``, ``message``) to the next ``times`` calls."""
        error = ApiError(status, code, message)
        return self._arm(f"http-{status}", route, status, error.body(), {}, times, where)

    def rate_limit(
        self,
        route: str | None,
        *,
        times: int = 1,
        retry_after_s: float = 0.05,
        scope: RateLimitScope = "user",
        where: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Answer 429 to the next ``times`` calls, shaped so discord.py sleeps ``retry_after_s`` and retries.

        discord.py treats a 429 without a ``Via`` header, or with a non-JSON body, as a Cloudflare ban and
        raises instead of retrying, so both are always present. ``scope="global"`` sets ``"global": true``
        and ``X-RateLimit-Global``, which makes discord.py's HTTP client pause every request.
        """
        is_global = scope == "global"
        body = {
            "message": "You are being rate limited.",
            "retry_after": retry_after_s,
            "global": is_global,
            "code": 0,
        }
        headers = {
            "Via": "1.1 google",
            "Retry-After": f"{retry_after_s:g}",
            "X-RateLimit-Scope": scope,
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        else:
            headers.update(
                {
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + retry_after_s:.3f}",
                    "X-RateLimit-Reset-After": f"{retry_after_s:.3f}",
                    "X-RateLimit-Bucket": f"fake-{route or 'any'}".replace(" ", "-"),
                }
            )
        return self._arm(f"rate-limit-{scope}", route, 429, body, headers, times, where)

    def respond(
        self,
        route: str | None,
        *,
        status: int,
        body: dict[str, Any] | str | None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        where: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Answer exactly this status, body and headers (for shapes the other helpers don't cover)."""
        return self._arm(f"custom-{status}", route, status, body, dict(headers or {}), times, where)

    def cut(
        self,
        route: str | None,
        *,
        times: int = 1,
        moment: CutMoment = "before",
        where: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Close the connection with no answer to the next ``times`` calls (aiohttp: ServerDisconnectedError).

        ``moment="before"``: the request is dropped unapplied. ``"after"``: the fake applies it (a message is
        posted or edited) and then the answer is lost, as when a connection dies mid-response.
        """
        fault = self._arm(f"cut-{moment}", route, 0, None, {}, times, where)
        fault.cut = moment
        return fault

    def hold(
        self,
        route: str | None,
        *,
        times: int = 1,
        then_cut: CutMoment | None = None,
        where: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Keep the next ``times`` matching requests waiting until ``fault.release()``, then answer them.

        While one is held (``fault.hits`` is not empty) the upload is in flight: a test can drop the gateway
        or change the world at exactly that moment. ``then_cut`` closes the connection on release instead
        of answering (as ``cut``).
        """
        fault = self._arm("hold", route, 0, None, {}, times, where)
        fault.gate = asyncio.Event()
        fault.cut = then_cut
        return fault

    def take(self, call: RecordedCall) -> Fault | None:
        """The first armed fault matching ``call``, with one use consumed; None when nothing matches."""
        for fault in self._faults:
            if fault.matches(call):
                fault.remaining -= 1
                fault.hits.append(call)
                return fault
        return None

    def _arm(
        self,
        kind: str,
        route: str | None,
        status: int,
        body: dict[str, Any] | str | None,
        headers: dict[str, str],
        times: int,
        where: Callable[[RecordedCall], bool] | None,
    ) -> Fault:
        if times < 1:
            raise ValueError("a fault needs times >= 1")
        fault = Fault(f"{kind}#{next(self._ids)}", route, status, body, headers, times, where)
        self._faults.append(fault)
        return fault
