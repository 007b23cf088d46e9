"""Ops with a plain-PyTorch reference and pluggable fast backends.

Every op is one function here; its module holds the reference implementation (the spec and the
test oracle) and registers its backends with the dispatcher in :mod:`echofast.ops._dispatch`.
Force a backend with ``backend=``, :func:`use_backend`, or ``ECHOFAST_BACKEND``.
"""

from ._dispatch import ENV_VAR, Backend, Op, registered_ops, use_backend
from .attention import attention, attention_reference
from .bias_residual import bias_residual, bias_residual_reference
from .feed_forward import feed_forward, feed_forward_reference, feed_forward_supported
from .geglu import geglu, geglu_linear, geglu_linear_reference, geglu_reference
from .group_norm import group_norm, group_norm_reference
from .layer_norm import (
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)
from .window_step import window_step, window_step_reference, window_tables

__all__ = [
    "ENV_VAR",
    "Backend",
    "Op",
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention",
    "attention_reference",
    "bias_residual",
    "bias_residual_reference",
    "feed_forward",
    "feed_forward_reference",
    "feed_forward_supported",
    "geglu",
    "geglu_linear",
    "geglu_linear_reference",
    "geglu_reference",
    "group_norm",
    "group_norm_reference",
    "layer_norm",
    "layer_norm_reference",
    "registered_ops",
    "use_backend",
    "window_step",
    "window_step_reference",
    "window_tables",
]
