"""Multi-head attention module with diffusers' ``Attention`` state-dict layout.

Keys: ``group_norm`` (optional), ``to_q``, ``to_k``, ``to_v``, ``to_out.0``. Q, K and V stay in the
layout the projections produce: (B, L, heads·D) is viewed as (B, heads, L, D) without a copy, and
the op's (B, heads, L, D) output is viewed back for ``to_out``. Feature maps in channels_last are
token-major already, so they enter and leave the projections without copies.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .norm import GroupNorm


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C): a free view for channels_last maps; for NCHW maps the
    transposed view diffusers feeds its projections (same GEMMs, same rounding)."""
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return x.reshape(b, c, h * w).transpose(1, 2)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Attention(nn.Module):
    """Self- or cross-attention over tokens (B, L, C) or feature maps (B, C, H, W).

    Args:
        query_dim: C of the queries (and of the output).
        heads, dim_head: number and width of heads; inner width heads·dim_head.
        cross_attention_dim: width of ``encoder_hidden_states`` (default: query_dim).
        bias: bias of to_q/to_k/to_v; ``out_bias``: bias of to_out.0.
        norm_num_groups: GroupNorm applied to the queries' input first (feature-map attention).
        residual_connection, rescale_output_factor: ``out = (attn(x) + x) / rescale``.

    Exact fast path: with a single key/value token (``encoder_hidden_states`` of length 1)
    softmax is identically 1, so the output is ``to_out(to_v(ehs))`` broadcast over the queries;
    the norm, ``to_q``, ``to_k`` and the softmax are skipped. ``last_path`` records which path ran.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (
            GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups is not None else None
        )
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList(
            [nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)]
        )
        self.last_path = ""

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            b, c, h, w = hidden_states.shape
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == 1:
            self.last_path = "single_key"
            out = self.to_out[1](self.to_out[0](self.to_v(encoder_hidden_states)))
            if spatial:
                out = out.transpose(1, 2)[..., None]
            out = out.expand_as(hidden_states)
        else:
            self.last_path = "general"
            x = hidden_states
            if self.group_norm is not None:
                x = self.group_norm(x if spatial else x.transpose(1, 2))
                x = x if spatial else x.transpose(1, 2)
            if spatial:
                x = _tokens(x)
            ctx = x if encoder_hidden_states is None else encoder_hidden_states
            q = self._heads(self.to_q(x))
            k = self._heads(self.to_k(ctx))
            v = self._heads(self.to_v(ctx))
            o = ops.attention(q, k, v)
            o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], self.heads * self.dim_head)
            out = self.to_out[1](self.to_out[0](o))
            if spatial:
                out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
                out = out.contiguous(memory_format=_memory_format(hidden_states))
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
