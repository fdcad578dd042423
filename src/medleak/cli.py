"""Shared plumbing for command-line entry points."""

import functools
import logging
import sys
import warnings

from medleak.errors import MedleakError

# absl's help flags end the program before main runs, with status 1; asking for help is no error.
HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")
# JAX logs each backend it probes and cannot start (`Unable to initialize backend 'tpu'`) at INFO,
# which absl prints; real problems are still WARNING and above.
BACKEND_PROBING_LOGGER = "jax._src.xla_bridge"


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` without the source line: `warning: <Category>: <message>`."""
    text = " ".join(str(message).split())
    return f"warning: {category.__name__}: {text} ({filename.rsplit('/', 1)[-1]}:{lineno})\n"


def quiet_console() -> None:
    """Warnings one line each; no backend-probing noise (GPU/TPU use is unchanged)."""
    warnings.formatwarning = one_line_warning
    logging.getLogger(BACKEND_PROBING_LOGGER).setLevel(logging.WARNING)


def main_guard(fn):
    """Wraps an entry point: a `MedleakError` becomes `error: <message>` on stderr and exit code 2.

    Also makes the console quiet (`quiet_console`) before the entry point runs.
    """
    quiet_console()

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        quiet_console()  # again: absl's app.run sets logging up between wrapping and calling
        try:
            return fn(*args, **kwargs)
        except MedleakError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapped


def run_absl(main, argv=None) -> None:
    """`absl.app.run(main_guard(main))`, except that `--help` (and its variants) exits 0."""
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    try:
        app.run(main_guard(main), argv)
    except SystemExit as e:
        asked_for_help = any(arg.split("=", 1)[0] in HELP_FLAGS for arg in argv[1:])
        if e.code == 1 and asked_for_help:
            sys.exit(0)
        raise
