"""User-facing errors.

Everything a user can get wrong (a flag, a file, a column) raises `MedleakError` with a one-line
message that names the thing and says what to do. Entry points catch it, print `error: <message>`
and exit with status 2 (see `medleak.cli.main_guard`), so users never see a bare traceback for bad input.
"""


class MedleakError(Exception):
    """A one-line, actionable error about the user's input or environment."""

    def __init__(self, message: str):
        # Keep it on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))
