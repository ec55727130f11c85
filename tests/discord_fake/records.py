"""What the fake saw: every REST call and gateway frame, in order, as plain values tests can assert on."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class UploadedFile:
    """One ``files[n]`` part of a multipart body."""

    field: str
    filename: str
    content_type: str | None
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclasses.dataclass
class RecordedCall:
    """One HTTP request the fake answered (REST, webhook, interaction callback or attachment download).

    ``route`` is the template, e.g. ``"POST /webhooks/{app}/{token}"``; ``params`` holds its path parameters
    (``{"app": "123", "token": "..."}``). ``json`` is the JSON body, or the ``payload_json`` part of a
    multipart body, whose ``files[n]`` parts are in ``files``. ``status`` and ``response`` are what the fake
    answered; ``fault`` names the armed fault that produced the answer, if any.
    """

    index: int
    at: float
    method: str
    path: str
    route: str | None
    params: dict[str, str]
    query: dict[str, str]
    json: Any
    files: list[UploadedFile]
    authorization: str | None
    status: int | None = None
    response: Any = None
    fault: str | None = None
    # The fake closed the connection instead of answering (``status`` is set if it applied the request first).
    cut: bool = False

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def payload(self) -> Any:
        """The request's JSON payload (an alias of ``json`` that reads better for message bodies)."""
        return self.json

    def __str__(self) -> str:
        extra = f" [{self.fault}]" if self.fault else ""
        if self.cut:
            extra += " [connection cut]"
        files = f" files={[f.filename for f in self.files]}" if self.files else ""
        path = self.path if len(self.path) <= 80 else self.path[:77] + "..."
        return f"#{self.index} {self.method} {path} -> {self.status}{extra}{files}"


@dataclasses.dataclass(frozen=True)
class GatewayFrame:
    """One gateway frame; ``direction`` is ``"in"`` (client → fake) or ``"out"`` (fake → client)."""

    index: int
    at: float
    connection: int
    direction: str
    op: int
    t: str | None
    s: int | None
    d: Any

    def __str__(self) -> str:
        name = f" {self.t}" if self.t else ""
        return f"#{self.index} conn{self.connection} {self.direction} op={self.op}{name} s={self.s}"
