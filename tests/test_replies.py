"""What a member is told for an error, and what the log keeps of it."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from discord import app_commands

from i2p2i_bot.gpu import GpuFault
from i2p2i_bot.replies import GPU_FAULT_MESSAGE, report_error, user_message


class FakeResponse:
    """An interaction response not sent yet, recording what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []

    def is_done(self) -> bool:
        return bool(self.sent)

    async def send_message(self, message: str, *, ephemeral: bool = False) -> None:
        self.sent.append((message, ephemeral))


def fake_interaction() -> Any:
    return SimpleNamespace(
        id=111, user=SimpleNamespace(id=222), response=FakeResponse(), locale="en-US", guild_locale=None
    )


def invoke_error(original: Exception) -> app_commands.CommandInvokeError:
    """The wrapper discord.py puts around an exception a command raised."""
    return app_commands.CommandInvokeError(SimpleNamespace(name="imagine"), original)  # type: ignore[arg-type]


FAULTS = [
    GpuFault("the GPU is unusable until a restart (CUDA error: an illegal memory access)", ran=True),
    GpuFault("the GPU is unusable until a restart (CUDA error: an illegal memory access)", ran=False),
]


@pytest.mark.parametrize("fault", FAULTS, ids=["ran", "refused"])
def test_a_gpu_fault_gets_a_sentence_rather_than_an_error_id(fault: GpuFault) -> None:
    """A GpuFault, raised directly or wrapped by a command, tells the member the bot restarts."""
    assert user_message(fault) == GPU_FAULT_MESSAGE
    assert user_message(invoke_error(fault)) == GPU_FAULT_MESSAGE
    assert GPU_FAULT_MESSAGE == "The GPU stopped working; the bot is restarting, so try again in a minute."


def test_a_bug_still_gets_no_sentence() -> None:
    """Any other internal error is still None (an error id), wrapped or not."""
    assert user_message(RuntimeError("boom")) is None
    assert user_message(invoke_error(RuntimeError("boom"))) is None


async def test_a_gpu_fault_is_told_to_the_member_and_logged_as_an_error_with_its_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The member gets the sentence ephemerally; the log an ERROR with the traceback and the CUDA error."""
    cause = RuntimeError("CUDA error: an illegal memory access was encountered")
    try:
        raise FAULTS[0] from cause
    except GpuFault as exc:
        fault = exc
    interaction = fake_interaction()
    with caplog.at_level(logging.INFO, logger="i2p2i.discord"):
        await report_error(interaction, invoke_error(fault))
    assert interaction.response.sent == [(GPU_FAULT_MESSAGE, True)]
    [record] = [r for r in caplog.records if r.name == "i2p2i.discord"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "the GPU failed in interaction 111 (user 222)"
    assert record.exc_info is not None
    text = logging.Formatter().formatException(record.exc_info)
    assert "GpuFault" in text and "an illegal memory access was encountered" in text
