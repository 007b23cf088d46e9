"""Pickling and copying of patched objects.

Patches are runtime state of one process (echofast models built around the diffusers parameters,
forced backends, the record that ``unpatch`` undoes), so ``pickle`` and ``torch.save`` store none
of it: the objects :func:`echofast.patch` installs reduce to what they stand for (a switched
module to an instance of its original class, an echofast attention processor to the processor it
replaced, a patch record to None), and a pickle of a patched pipeline or model is the plain
diffusers object, which loads without echofast. :mod:`copy` calls ``__reduce_ex__`` too, so these
objects define ``__copy__`` and ``__deepcopy__`` with :func:`copy_as_is`: copies stay patched.
"""

from __future__ import annotations

import copy
import operator
from typing import Any


def unpickled_as(obj: Any) -> tuple:
    """A ``__reduce_ex__`` value that unpickles to ``obj`` (pickled as usual: shared objects stay
    shared) instead of the object being reduced."""
    return operator.getitem, ((obj,), 0)


def copy_as_is(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """What ``copy.copy(obj)`` (``memo`` None) or ``copy.deepcopy(obj, memo)`` makes of an object
    whose ``__reduce_ex__`` does not reduce to itself: an object of the same class with its
    ``__dict__`` state (deep-copied with ``memo``)."""
    cls = type(obj)
    clone = cls.__new__(cls)
    getstate = getattr(obj, "__getstate__", None)
    state = getstate() if getstate is not None else obj.__dict__
    if memo is not None:
        memo[id(obj)] = clone
        state = copy.deepcopy(state, memo)
    if hasattr(clone, "__setstate__"):
        clone.__setstate__(state)
    else:
        clone.__dict__.update(state)
    return clone
