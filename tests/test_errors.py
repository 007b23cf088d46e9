"""echofast.errors.add_note: PEP 678 notes on Python >= 3.11, and where 3.10 keeps them."""

from __future__ import annotations

import traceback

import pytest

from echofast.errors import add_note


def test_a_note_is_printed_under_the_message():
    err = OSError("disk full")
    add_note(err, "while writing a.avi")
    add_note(err, "and b.avi")
    assert err.__notes__ == ["while writing a.avi", "and b.avi"]
    printed = "".join(traceback.format_exception(err))
    if hasattr(err, "add_note"):  # Python >= 3.11 prints notes
        assert printed.rstrip().endswith("disk full\nwhile writing a.avi\nand b.avi")


class _WithoutAddNote(Exception):
    """An exception as Python 3.10 has them: no ``add_note``."""

    @property
    def add_note(self):
        raise AttributeError("add_note")


def test_without_add_note_the_notes_are_kept_in_dunder_notes():
    err = _WithoutAddNote("x")
    add_note(err, "first")
    add_note(err, "second")
    assert err.__notes__ == ["first", "second"]
    with pytest.raises(_WithoutAddNote) as info:
        raise err
    assert info.value.__notes__ == ["first", "second"]
