"""Typed errors raised by echofast. Every message names the file, key or value at fault."""

from __future__ import annotations


class EchofastError(Exception):
    """Base class of all echofast errors."""


class ConfigError(EchofastError, ValueError):
    """A model config holds a key or value that echofast does not support, or is malformed."""


class WeightsError(EchofastError, ValueError):
    """A weights file is missing, unreadable, or does not match the model."""


class BackendUnavailable(EchofastError, RuntimeError):
    """An explicitly requested op backend cannot run the given inputs."""

    def __init__(self, op: str, backend: str, reasons: list[str]):
        self.op = op
        self.backend = backend
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"backend {backend!r} cannot run op {op!r}:\n{lines}")


class MissingFileError(WeightsError, FileNotFoundError):
    """A model folder, config or weights file does not exist."""


class NonFiniteError(EchofastError, FloatingPointError):
    """A latent or frame became NaN or infinite; the message names the sample and the step."""


def add_note(err: BaseException, note: str) -> None:
    """Attach ``note`` to ``err`` (PEP 678): ``err.add_note`` on Python >= 3.11, which tracebacks
    print under the message; on 3.10 the note is appended to ``err.__notes__`` all the same
    (where 3.11's code and the ``exceptiongroup`` backport read it), but 3.10's own tracebacks
    do not print it."""
    if hasattr(err, "add_note"):
        err.add_note(note)
        return
    notes = getattr(err, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        err.__notes__ = notes
    notes.append(note)


def first_of(items: list[str], sep: str = ", ", n: int = 10) -> str:
    """``items`` for an error message: the first ``n`` joined by ``sep``, then how many more."""
    return sep.join(items[:n]) + (f"{sep}(+{len(items) - n} more)" if len(items) > n else "")
