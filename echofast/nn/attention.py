"""Multi-head attention module with diffusers' ``Attention`` state-dict layout.

Keys: ``group_norm`` (optional), ``to_q``, ``to_k``, ``to_v``, ``to_out.0``. Q, K and V stay in the
layout the projections produce: (B, L, heads·D) is viewed as (B, heads, L, D) without a copy, and
the op's (B, heads, L, D) output, token-major for the fast backends (triton, xformers, sdpa), is
viewed back as (B, L, heads·D) for ``to_out`` without a copy. Feature maps in channels_last are
token-major already, so they enter and leave the projections without copies.

Fused QKV (inference on :data:`FUSED_QKV_DEVICES`, i.e. CUDA): a self-attention module keeps the
weights (and biases) of ``to_q``, ``to_k`` and ``to_v`` as adjacent slices of one (3·heads·D, C)
storage, so the concatenated weight is a view of the live parameters and Q, K, V come from one
GEMM whose output the attention kernels read through strides. The parameters stay separate
``nn.Parameter`` objects with diffusers' state-dict keys; they are (re)packed after construction,
``.to()``/``.half()`` and ``load_state_dict``, and a forward that finds them unpacked (or runs
under autograd) uses the three projections, so the fused weight can never be stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._mode import eager_inference
from ._packing import pack_rows, packed_linear
from .norm import GroupNorm

#: device types on which self-attention projects Q, K and V with one GEMM. Not CPU: there the
#: three GEMMs cost about the same as one, and SDPA's CPU kernel reads Q/K/V interleaved in one
#: (B, L, 3·heads·D) buffer (row stride 3·heads·D) more slowly than separate buffers (measured
#: up to 1.3x slower on the LVDM's shapes), so the fused layout is a net loss there.
FUSED_QKV_DEVICES: frozenset[str] = frozenset({"cuda"})


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
    the norm, ``to_q``, ``to_k`` and the softmax are skipped. ``last_path`` records which path ran
    (``"single_key"`` or ``"general"``), ``last_qkv`` how the general path projected
    (``"fused"``: one QKV GEMM, see the module docstring; ``"separate"``).
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
        self.last_qkv = ""
        self.is_self_attention = cross_attention_dim is None
        self.pack_qkv()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.pack_qkv())

    # ---- fused QKV ---------------------------------------------------------------------------

    def _qkv_params(self, name: str) -> list[torch.Tensor] | None:
        ps = [getattr(lin, name) for lin in (self.to_q, self.to_k, self.to_v)]
        return None if any(p is None for p in ps) else ps

    def pack_qkv(self) -> None:
        """Store to_q/to_k/to_v weights (and biases) as adjacent slices of one tensor.

        Values, parameter objects and ``requires_grad`` are unchanged; only storage moves.
        Cross-attention modules and mixed dtypes/devices are left alone.
        """
        if not self.is_self_attention:
            return
        for name in ("weight", "bias"):
            pack_rows(self._qkv_params(name))

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.pack_qkv()  # conversions give every parameter its own storage
        return out

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The (3·heads·D, C) weight and (3·heads·D,) bias of one QKV GEMM, as views of the live
        parameters; None under autograd, for cross-attention modules, or when not packed."""
        if not self.is_self_attention or not eager_inference():
            return None
        return packed_linear(self._qkv_params("weight"), self._qkv_params("bias"))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def along_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of frame-major tokens x (B, T, S, C) along their frames: every position
        s of every video b is one sequence over the T frames → (B, T, S, C). The same values as
        :meth:`forward` on the (B·S, T, C) sequences, without transposing the tokens: Q, K and V
        are (B, S, heads, T, D) views of the projections (of one fused QKV GEMM where it applies),
        which :func:`echofast.ops.attention` takes with two batch dims, and its output is read
        back frame-major. For plain self-attention modules (no group norm, residual or rescale).
        """
        if (
            self.group_norm is not None
            or self.residual_connection
            or (self.rescale_output_factor != 1.0)
        ):
            raise ValueError("along_frames is for plain self-attention modules")
        b, t, s, _ = x.shape
        heads = self.heads
        self.last_path = "general"
        fused = self.fused_qkv() if x.device.type in FUSED_QKV_DEVICES else None
        if fused is not None:
            self.last_qkv = "fused"
            q, k, v = F.linear(x, *fused).view(b, t, s, 3, heads, -1).unbind(3)
        else:
            self.last_qkv = "separate"
            q, k, v = (lin(x).view(b, t, s, heads, -1) for lin in (self.to_q, self.to_k, self.to_v))
        o = ops.attention(*(u.permute(0, 2, 3, 1, 4) for u in (q, k, v)))  # (B, S, heads, T, ·)
        o = o.permute(0, 3, 1, 2, 4).reshape(b, t, s, heads * o.shape[-1])
        return self.to_out[1](self.to_out[0](o))

    def single_key(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, 1, C): the output of every query against a single key/value token
        ``encoder_hidden_states`` (B, 1, D): softmax over one key is 1, so it is
        ``to_out(to_v(encoder_hidden_states))`` whatever the queries are."""
        self.last_path = "single_key"
        return self.to_out[1](self.to_out[0](self.to_v(encoder_hidden_states)))

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            b, c, h, w = hidden_states.shape
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == 1:
            out = self.single_key(encoder_hidden_states)
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
            fused = None
            if encoder_hidden_states is None and x.device.type in FUSED_QKV_DEVICES:
                fused = self.fused_qkv()
            if fused is not None:
                # one GEMM; q, k, v are strided views of its (B, L, 3·heads·D) output
                self.last_qkv = "fused"
                qkv = F.linear(x, *fused)
                q, k, v = (self._heads(t) for t in qkv.split(self.heads * self.dim_head, -1))
            else:
                self.last_qkv = "separate"
                ctx = x if encoder_hidden_states is None else encoder_hidden_states
                q = self._heads(self.to_q(x))
                k = self._heads(self.to_k(ctx))
                v = self._heads(self.to_v(ctx))
            o = ops.attention(q, k, v)
            # (B, heads, L, D) -> (B, L, heads·D): a view for token-major outputs
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
