"""Run the i2p2i Discord bot: python bot.py [--config PATH] [--models smoke|default]."""

from __future__ import annotations

import argparse
import sys

from i2p2i_bot.app import run_bot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bot.py", description="Run the i2p2i Discord bot.")
    parser.add_argument("--config", metavar="PATH", help="settings file (TOML); see config.example.toml")
    parser.add_argument("--models", choices=("default", "smoke"), help="'smoke': tiny random models (noise)")
    args = parser.parse_args(argv)
    return run_bot(args.config, args.models)


if __name__ == "__main__":
    sys.exit(main())
