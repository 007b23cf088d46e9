"""Call-site patches: diffusers modules whose GroupNorm / SiLU / attention calls run on echofast's
ops, with every other step of the diffusers computation kept as it is.

Each ``*_forward`` below is the body of a patched module's ``forward``; it receives the module,
its :class:`~echofast.patching.core.SiteState` and the original class (``base``), and falls back to
``base.forward`` for any call outside what it handles. :class:`AttentionProcessor` is installed
with diffusers' own ``Attention.set_processor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import ops
from .pickling import copy_as_is, unpickled_as

if TYPE_CHECKING:
    from .core import SiteState


def _layout_ok(x: torch.Tensor) -> bool:
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def group_norm(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    backend: str | None,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(x)`` (+ modulation) (+ SiLU) through :func:`echofast.ops.group_norm`.

    A strided view (e.g. the permuted (B, C, T, H, W) view of a temporal resnet) is made
    contiguous first, as ``F.group_norm`` does internally, so that every backend can take it.
    """
    if not _layout_ok(x):
        x = x.contiguous()
    return ops.group_norm(
        x,
        norm.num_groups,
        norm.weight,
        norm.bias,
        norm.eps,
        activation=activation,
        scale=scale,
        shift=shift,
        backend=backend,
    )


def group_norm_forward(
    self: nn.GroupNorm, st: SiteState, base: type, input: torch.Tensor
) -> torch.Tensor:
    """``nn.GroupNorm.forward`` on :func:`echofast.ops.group_norm` (inputs of 3+ dims)."""
    if input.dim() < 3 or not input.is_floating_point():
        return base.forward(self, input)
    return group_norm(self, input, st.gn_backend)


def resnet2d_forward(
    self: Any, st: SiteState, base: type, input_tensor: torch.Tensor, temb: Any, *args, **kwargs
) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D`` with norm1+SiLU and norm2(+scale/shift)+SiLU fused."""
    if args or kwargs:  # the deprecated ``scale`` argument: diffusers' own handling
        return base.forward(self, input_tensor, temb, *args, **kwargs)
    x = input_tensor
    h = group_norm(self.norm1, x, st.gn_backend, "silu")
    if self.upsample is not None:
        if h.shape[0] >= 64:  # as diffusers: nearest upsampling of NHWC fails for big batches
            x = x.contiguous()
            h = h.contiguous()
        x = self.upsample(x)
        h = self.upsample(h)
    elif self.downsample is not None:
        x = self.downsample(x)
        h = self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "default":
        if temb is not None:
            h = h + temb
        h = group_norm(self.norm2, h, st.gn_backend, "silu")
    elif self.time_embedding_norm != "scale_shift":  # e.g. a VAE decoder's "group": no temb
        h = group_norm(self.norm2, h, st.gn_backend, "silu")
    else:
        if temb is None:
            raise ValueError(
                " `temb` should not be None when `time_embedding_norm` is "
                f"{self.time_embedding_norm}"
            )
        scale, shift = (c.flatten(1).expand(h.shape[0], -1) for c in temb.chunk(2, dim=1))
        h = group_norm(self.norm2, h, st.gn_backend, "silu", scale, shift)
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        if self.training:
            x = x.contiguous()
        x = self.conv_shortcut(x)
    return (x + h) / self.output_scale_factor


def temporal_resnet_forward(
    self: Any, st: SiteState, base: type, input_tensor: torch.Tensor, temb: torch.Tensor
) -> torch.Tensor:
    """diffusers' ``TemporalResnetBlock`` ((B, C, T, H, W)) with both GroupNorm+SiLU fused."""
    h = group_norm(self.norm1, input_tensor, st.gn_backend, "silu")
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        t = self.time_emb_proj(self.nonlinearity(temb))[:, :, :, None, None]
        h = h + t.permute(0, 2, 1, 3, 4)
    h = group_norm(self.norm2, h, st.gn_backend, "silu")
    h = self.conv2(self.dropout(h))
    x = input_tensor
    if self.conv_shortcut is not None:
        x = self.conv_shortcut(x)
    return x + h


def entry_forward(self: nn.Module, st: SiteState, base: type, *args, **kwargs) -> Any:
    """An entry module's own forward (patched only to run under ``dtype`` autocast)."""
    return base.forward(self, *args, **kwargs)


class AttentionProcessor:
    """A diffusers attention processor on :func:`echofast.ops.attention`.

    Computes what the diffusers processor it replaces (``AttnProcessor2_0`` or ``AttnProcessor``)
    computes (spatial norm, GroupNorm on the queries' input, cross-attention norm, q/k norms where
    that processor applies them, residual, rescale), with:

    * the GroupNorm on :func:`echofast.ops.group_norm`;
    * attention on :func:`echofast.ops.attention` over (N, heads, L, D) views of the projections;
    * the exact single-key path: with one key/value token softmax is identically 1, so every
      query's output is ``to_out(to_v(context))``; ``to_q``, ``to_k`` and the softmax are skipped
      (for self-attention over one token, ``to_v`` of the normalised token).

    Calls with an attention mask or extra arguments go to the processor it replaced
    (:attr:`original`). :attr:`last_path` records which path ran: "single_key", "general" or
    "original". It pickles as :attr:`original`; copies are copies of this processor.
    """

    def __init__(
        self,
        original: Any,
        *,
        gn_backend: str | None,
        attn_backend: str | None,
        classic: bool,
    ):
        self.original = original
        self.gn_backend = gn_backend
        self.attn_backend = attn_backend
        #: replacing ``AttnProcessor``, which scales by ``attn.scale`` and applies no q/k norms
        #: (``AttnProcessor2_0`` uses SDPA's default 1/sqrt(D) and applies them)
        self.classic = classic
        self.last_path = ""

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickles as :attr:`original` (see :mod:`echofast.patching.pickling`)."""
        return unpickled_as(self.original)

    __copy__ = __deepcopy__ = copy_as_is

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        ctx = encoder_hidden_states
        if (
            attention_mask is not None
            or args
            or kwargs
            or hidden_states.dim() not in (3, 4)
            or (ctx is not None and (ctx.dim() != 3 or ctx.shape[0] != hidden_states.shape[0]))
        ):
            self.last_path = "original"
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        x = hidden_states
        if ctx is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        spatial = x.dim() == 4
        queries = x.shape[2] * x.shape[3] if spatial else x.shape[1]
        keys = queries if ctx is None else ctx.shape[1]
        if keys == 1:
            self.last_path = "single_key"
            out = self._single_key(attn, x, ctx, queries, residual=attn.residual_connection)
        else:
            self.last_path = "general"
            out = self._general(attn, x, ctx, spatial)
        if spatial:  # tokens (B, H·W, C) → (B, C, H, W), the strided view diffusers returns
            out = out.transpose(1, 2).unflatten(2, x.shape[2:])
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out

    def _tokens(self, attn: Any, x: torch.Tensor, spatial: bool) -> torch.Tensor:
        """The queries' input as tokens (B, L, C), after the attention's own GroupNorm."""
        if spatial:
            if attn.group_norm is not None:
                x = group_norm(attn.group_norm, x, self.gn_backend)
            b, c = x.shape[:2]
            return x.reshape(b, c, -1).transpose(1, 2)
        if attn.group_norm is not None:
            x = group_norm(attn.group_norm, x.transpose(1, 2), self.gn_backend).transpose(1, 2)
        return x

    def _single_key(
        self, attn: Any, x: torch.Tensor, ctx: torch.Tensor | None, queries: int, residual: bool
    ) -> torch.Tensor:
        """Tokens (B, queries, C_out): ``to_out(to_v(context))`` for every query."""
        src = self._tokens(attn, x, x.dim() == 4) if ctx is None else ctx
        o = attn.to_out[0](attn.to_v(src))  # (B, 1, C_out)
        o = attn.to_out[1](o.expand(x.shape[0], queries, o.shape[-1]))  # dropout per element
        # a broadcast view is fine for the residual sum, which writes a new tensor; else a copy
        return o if residual or o.stride(1) != 0 else o.contiguous()

    def _general(
        self, attn: Any, x: torch.Tensor, ctx: torch.Tensor | None, spatial: bool
    ) -> torch.Tensor:
        tokens = self._tokens(attn, x, spatial)
        src = tokens if ctx is None else ctx
        q = attn.to_q(tokens)
        k = attn.to_k(src)
        v = attn.to_v(src)
        heads = attn.heads
        d = k.shape[-1] // heads
        b = src.shape[0]
        q = q.view(b, -1, heads, d).transpose(1, 2)
        k = k.view(b, -1, heads, d).transpose(1, 2)
        v = v.view(b, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None and not self.classic:
            q = attn.norm_q(q)
        if attn.norm_k is not None and not self.classic:
            k = attn.norm_k(k)
        scale = attn.scale if self.classic else None
        o = ops.attention(q, k, v, scale=scale, backend=self.attn_backend)
        o = o.transpose(1, 2).reshape(b, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](o))
