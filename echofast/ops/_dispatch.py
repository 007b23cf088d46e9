"""Backend dispatch shared by every op.

Each op owns an ordered list of backends (fastest first, the plain-PyTorch reference last).
A backend declares what it supports through ``not_supported_reasons(*args, **kwargs)``, which
returns an empty list when it can run the call. Selection, in order of precedence:

1. ``backend=`` passed to the op call;
2. the innermost :func:`use_backend` context;
3. the ``ECHOFAST_BACKEND`` environment variable (``"torch"`` for every op that has a backend of
   that name, or ``"group_norm=torch,attention=sdpa"`` per op);
4. automatic: the first backend with no reasons.

A forced backend (1-3) that cannot run raises :class:`~echofast.errors.BackendUnavailable` listing
every reason; automatic choice falls back quietly. Backends import optional dependencies (Triton,
xformers, the extension) only inside their methods, so importing an op module stays cheap.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BackendUnavailable

ENV_VAR = "ECHOFAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``fn`` computes the op; ``reasons`` returns why it cannot run the given arguments (empty when it
    can). ``description`` is shown by ``echofast info``. ``traceable``: whether ``torch.compile``
    should trace ``fn``; a backend that launches its own kernels (Triton, xformers) is not, so that
    inside a compiled region the op runs a PyTorch backend that inductor fuses itself.
    """

    name: str
    fn: Callable[..., Any]
    reasons: Callable[..., list[str]]
    description: str = ""
    traceable: bool = True

    def not_supported_reasons(self, *args: Any, **kwargs: Any) -> list[str]:
        if not self.traceable and torch.compiler.is_compiling():
            return [
                "inside torch.compile (its own kernels are not traced: inductor fuses a "
                "PyTorch backend instead)"
            ]
        return list(self.reasons(*args, **kwargs))


_OPS: dict[str, Op] = {}
_FORCED: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar(
    "echofast_forced_backends", default=()
)


def _parse_spec(spec: str, source: str) -> dict[str, str]:
    """``"torch"`` -> {"*": "torch"}; ``"group_norm=torch, attention=sdpa"`` -> per-op entries.

    An unknown op, or a name for every op that no op has a backend of (a typo that would
    otherwise force nothing, silently), is a ValueError naming ``source`` and what is known."""
    out: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            if op not in _OPS:
                raise ValueError(f"{source}: unknown op {op!r} in {spec!r}; ops: {sorted(_OPS)}")
            out[op] = name
        else:
            known = sorted({b for o in _OPS.values() for b in o.backends})
            if part not in known:
                raise ValueError(
                    f"{source}: no op has a backend named {part!r} (in {spec!r}); backends: {known}"
                )
            out["*"] = part
    return out


class Op:
    """A named op with ordered backends; calling it dispatches."""

    def __init__(
        self,
        name: str,
        backends: list[Backend],
        example: Callable[[str], tuple],
        *,
        register: bool = True,
    ):
        if not backends:
            raise ValueError(f"op {name!r} needs at least one backend")
        self.name = name
        self.backends = {b.name: b for b in backends}
        self._example = example
        if register:
            _OPS[name] = self

    @property
    def reference(self) -> Backend:
        """The plain-PyTorch backend: the spec, the test oracle and the fallback."""
        return list(self.backends.values())[-1]

    def _forced(self, backend: str | None) -> tuple[str | None, str]:
        if backend is not None:
            return backend, "backend= argument"
        # torch.compile cannot trace a ContextVar: use_backend() blocks are not seen while a
        # compiled region is traced (backend= and ECHOFAST_BACKEND still are)
        forced = () if torch.compiler.is_compiling() else _FORCED.get()
        for spec in reversed(forced):
            if self.name in spec:
                return spec[self.name], "use_backend()"
            if spec.get("*") in self.backends:
                return spec["*"], "use_backend()"
        env = os.environ.get(ENV_VAR, "")
        if env:
            spec = _parse_spec(env, ENV_VAR)
            if self.name in spec:
                return spec[self.name], f"{ENV_VAR}={env!r}"
            if spec.get("*") in self.backends:
                return spec["*"], f"{ENV_VAR}={env!r}"
        return None, ""

    def select(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Backend:
        """The backend that would run these arguments (raises if a forced one cannot)."""
        name, source = self._forced(backend)
        if name is not None:
            chosen = self.backends.get(name)
            if chosen is None:
                raise BackendUnavailable(
                    self.name,
                    name,
                    [f"no such backend (requested by {source}); known: {list(self.backends)}"],
                )
            reasons = chosen.not_supported_reasons(*args, **kwargs)
            if reasons:
                raise BackendUnavailable(self.name, name, [*reasons, f"requested by {source}"])
            return chosen
        for candidate in self.backends.values():
            if not candidate.not_supported_reasons(*args, **kwargs):
                return candidate
        reasons = {b.name: b.not_supported_reasons(*args, **kwargs) for b in self.backends.values()}
        raise BackendUnavailable(
            self.name, "auto", [f"{k}: {'; '.join(v)}" for k, v in reasons.items()]
        )

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        return self.select(*args, backend=backend, **kwargs).fn(*args, **kwargs)

    def report(self, device: str) -> dict[str, list[str]]:
        """For a typical input on ``device``: each backend's reasons (empty = can run)."""
        args, kwargs = self._example(device)
        return {b.name: b.not_supported_reasons(*args, **kwargs) for b in self.backends.values()}


def registered_ops() -> dict[str, Op]:
    return dict(_OPS)


@contextlib.contextmanager
def use_backend(spec: str | None = None, **per_op: str) -> Iterator[None]:
    """Force backends inside a ``with`` block.

    ``use_backend("torch")`` forces the backend named ``torch`` for every op that has one;
    ``use_backend(attention="sdpa")`` forces one op. A forced backend that cannot run raises.
    """
    forced = _parse_spec(spec, "use_backend") if spec else {}
    for op, name in per_op.items():
        if op not in _OPS:
            raise ValueError(f"use_backend: unknown op {op!r}; ops: {sorted(_OPS)}")
        forced[op] = name
    token = _FORCED.set((*_FORCED.get(), forced))
    try:
        yield
    finally:
        _FORCED.reset(token)
