"""Shared plumbing for command-line entry points."""

import functools
import sys

from medleak.errors import MedleakError


def main_guard(fn):
    """Wraps an entry point: a `MedleakError` becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedleakError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapped
