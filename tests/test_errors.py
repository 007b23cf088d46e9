"""echofast.errors: the typed errors' built-in bases and messages, and add_note (PEP 678 notes on
Python >= 3.11, and where 3.10 keeps them)."""

from __future__ import annotations

import traceback

import pytest

from echofast.errors import (
    BackendUnavailable,
    ConfigError,
    EchofastError,
    MissingFileError,
    NonFiniteError,
    WeightsError,
    add_note,
)


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


@pytest.mark.parametrize(
    "cls,bases",
    [
        (ConfigError, (EchofastError, ValueError)),
        (WeightsError, (EchofastError, ValueError)),
        (MissingFileError, (WeightsError, FileNotFoundError, OSError)),
        (NonFiniteError, (EchofastError, FloatingPointError)),
        (BackendUnavailable, (EchofastError, RuntimeError)),
    ],
)
def test_errors_are_caught_by_the_builtin_handlers_callers_already_have(cls, bases):
    err = BackendUnavailable("op", "b", []) if cls is BackendUnavailable else cls("at fault")
    for base in bases:
        with pytest.raises(base):
            raise err


def test_backend_unavailable_lists_every_reason_on_its_own_line():
    reasons = ["needs CUDA tensors", "head dim 96 > 64"]
    err = BackendUnavailable("attention", "triton", reasons)
    reasons.append("added later")
    assert (err.op, err.backend, err.reasons) == ("attention", "triton", reasons[:2])
    assert str(err) == (
        "backend 'triton' cannot run op 'attention':\n  - needs CUDA tensors\n  - head dim 96 > 64"
    )
