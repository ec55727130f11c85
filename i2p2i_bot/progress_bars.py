"""The model libraries' own progress bars: drawn on a terminal, kept out of logs.

diffusers, transformers and huggingface_hub draw tqdm bars while they load and download models. On a
terminal a bar redraws one line; in a file, a pipe or a container's log every redraw is another run of
carriage returns and escape codes between the log lines, so there the bars are turned off.
"""

from __future__ import annotations

import sys
from typing import TextIO


def only_on_a_terminal(stream: TextIO | None = None) -> bool:
    """Turn the libraries' progress bars off unless `stream` (default: stderr, where tqdm draws them) is a
    terminal; True when they stay on. Call it once, before loading models: the switches are process-wide."""
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        return True
    disable_library_bars()
    return False


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced stream without isatty, or a closed one
        return False


def disable_library_bars() -> None:
    """No progress bars from diffusers, transformers or huggingface_hub in this process from now on."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
