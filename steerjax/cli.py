"""Shared entry point for the experiment scripts: steerjax errors end as one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Any, Callable


def run_cli(parse_args: Callable[[Any], Any], run: Callable[[Any], Any], argv=None) -> int:
    """Parse argv, run, and turn a SteerjaxError into `error: ...` on stderr with exit code 2."""
    from steerjax.errors import SteerjaxError

    args = parse_args(argv)
    try:
        run(args)
    except SteerjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
