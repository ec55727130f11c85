"""Run the i2p2i Discord bot from a checkout: python bot.py [--config PATH] [--models smoke|default].

Installed, the same command is `i2p2i-bot`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from i2p2i_bot import app


def main(argv: Sequence[str] | None = None) -> int:
    return app.main(argv, prog="bot.py")


if __name__ == "__main__":
    sys.exit(main())
