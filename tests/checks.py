"""Assertions shared by test modules."""

import pytest

from medleak.errors import MedleakError


def raises(fn, *fragments):
    """Runs fn, expects a one-line MedleakError containing every fragment; returns the message."""
    with pytest.raises(MedleakError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message
