"""Spatio-temporal (video) UNet pieces with the state-dict layout of diffusers' SVD UNet.

Activations move between modules as frames ``(B·T, C, H, W)`` (batch-major, frame-minor), as in
diffusers' ``UNetSpatioTemporalConditionModel``; every module also takes the frame count ``T``.
The time embedding ``temb`` (B, E) and the conditioning ``context`` (B, L, D) are per video, not
repeated per frame: whatever depends only on them is computed once per video and broadcast.

Exact rewrites of diffusers' computation (same values up to fp rounding):

* Temporal mixing ``a·x + (1 - a)·(x + h)`` of the resnet is ``x + (1 - a)·h``.
* Cross-attention of frame tokens against a per-video context is done per video, with the frames'
  tokens as one query sequence (queries are independent); with a single context token
  :class:`~echofast.nn.attention.Attention` returns ``to_out(to_v(context))`` without touching the
  queries, so their LayerNorm is skipped too.
* The frame-position embedding is computed once per transformer call for ``T`` frames.

Layout and CPU speed (same values): the UNet keeps activations channels-last, so a frame map
(B·T, C, H, W) is physically (B·T, H·W, C) tokens and its (B, C, T, H, W) view, used by the
temporal resnet, is channels-last-3d: no permute copies at the transformers or temporal resnets.
The temporal (3,1,1) Conv3d runs as a (3,1) Conv2d over (T, H·W) (as three GEMMs on shifted token
rows in inference on :data:`TEMPORAL_GEMMS_DEVICES`, none yet, for maps of up to
:data:`TEMPORAL_GEMMS_MAX_DIM` channels). Without autograd, residual sums reuse the storage of
fresh temporaries, and on CPU per-token branches (feed-forwards, self-attention) run in chunks of
rows (:data:`CPU_CHUNK_BYTES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._mode import eager_inference
from ._packing import adjacent, concat_view, pack_rows
from .attention import Attention
from .embeddings import (
    RunMemo,
    TimeEmbedding,
    TimestepEmbedding,
    conv_without_bias,
    project_time,
    timestep_features,
)
from .norm import GroupNorm, LayerNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

GROUPS = 32


#: CPU inference runs per-token residual branches on chunks of about this many bytes of the
#: feed-forward's widest temporary (rows × 8·C floats), so temporaries stay in cache and in the
#: allocator's heap instead of being mapped and faulted in afresh. 0 disables chunking.
CPU_CHUNK_BYTES = 8 << 20


def _add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, in place in ``fresh`` (a temporary of the full shape) without autograd."""
    if not eager_inference():
        return fresh + other
    return fresh.add_(other)


def _residual(x: torch.Tensor, branch, *, inplace: bool) -> torch.Tensor:
    """``x + branch(x)`` for a branch that treats each ``x[i]`` (dim 0) independently.

    CPU inference evaluates it on chunks of dim 0, writing into x when ``inplace`` (x must then be
    a temporary of the caller) or into a new tensor. Otherwise one call on the whole of x.
    """
    if not eager_inference() or x.device.type != "cpu" or CPU_CHUNK_BYTES <= 0:
        return _add(branch(x), x)
    rows = CPU_CHUNK_BYTES // (8 * x.shape[-1] * x.element_size())
    step = max(1, rows // (x[0].numel() // x.shape[-1]))
    if step >= x.shape[0]:
        return x.add_(branch(x)) if inplace else branch(x).add_(x)
    out = x if inplace else torch.empty_like(x)
    for i in range(0, x.shape[0], step):
        torch.add(x[i : i + step], branch(x[i : i + step]), out=out[i : i + step])
    return out


# ---- transformer pieces ---------------------------------------------------------------------


#: device types on which a GEGLU's projection and gate run as one Triton GEMM with the GEGLU in
#: its epilogue (:func:`echofast.ops.geglu_linear`) in eager inference: CUDA, where
#: ``bench/bench_geglu.py`` (H100, 2026-11-26, CUDA-graph timings, fp16) measured it at 0.79x
#: the time of cuBLAS's GEMM followed by the fused GEGLU pass over one LVDM step's 48 GEGLUs at
#: one window (0.83 vs 1.06 ms) and 0.84x at eight (5.94 vs 7.04 ms); level for level it is
#: faster at K = 128 and 256 and within 6 % at K = 512 (bench/results/geglu_<card>.csv).
FUSED_GEGLU_DEVICES: frozenset[str] = frozenset({"cuda"})

#: device types on which a whole feed-forward (GEGLU projection, gate, output projection and the
#: block's residual add) runs as one Triton kernel that keeps the GEGLU output on chip
#: (:func:`echofast.ops.feed_forward`) in eager inference, where the op takes the operands (fp16 /
#: bf16) and the rows are at most :data:`FUSED_FF_MAX_DIM` wide. ``bench/bench_feed_forward.py``
#: (H100, 2026-11-27, git c0b27e8, CUDA-graph timings, fp16) timed it against the two-GEMM path
#: at the LVDM's call sites: at C = 128 (the 15 level-0 sites) 0.80x the time at 5 windows (143.6
#: vs 178.9 us, 3 pipeline stages) and at 40 windows (1056 vs 1325 us); at C = 256 2.3-3.4x
#: slower (its tiles hold 64 rows and 32 inner columns; the GEMMs reach 250-296 TFLOP/s there).
FUSED_FF_DEVICES: frozenset[str] = frozenset({"cuda"})
#: the widest feed-forward (C) that goes to the one kernel on :data:`FUSED_FF_DEVICES` (above)
FUSED_FF_MAX_DIM = 128

#: device types on which the temporal resnets' (3,1,1) convolutions run, in inference on
#: channels-last-3d maps, as three GEMMs on shifted token rows (:func:`temporal_conv_gemms`)
#: instead of a (3,1) Conv2d over (T, H·W). Empty until a GPU lease's
#: ``bench/bench_temporal_conv.py`` decides: the third H100 lease (2026-11-27, git 3a36557) saw
#: the Conv2d at C = 128 (5 windows) on cuDNN's sm80 kernel at about 120 TFLOP/s (0.66 ms per
#: UNet call in 10 convolutions) while cuBLAS ran a (81920, 128) x (128, 128) product in about
#: 12 us; on the CPU the GEMMs were about 2x slower than the Conv2d. The form is 3 kernels where
#: the Conv2d is 1: at all 44 temporal convolutions of an LVDM call that is 88 kernels more (646
#: -> 734 per call, over issue 9's 700), at the 10 of C = 128 only 20: hence the width limit
#: below. The benchmark's summary names the widest C at which the GEMMs won at every windows count.
TEMPORAL_GEMMS_DEVICES: frozenset[str] = frozenset()
#: the widest map (C) whose temporal convolutions take the three GEMMs on
#: :data:`TEMPORAL_GEMMS_DEVICES` (above); 128 is the prediction (the level-0 maps, where cuDNN
#: fell back to its sm80 kernel), to be confirmed with the device set
TEMPORAL_GEMMS_MAX_DIM = 128


def temporal_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A (3,1,1) Conv3d with padding (1,0,0) as a (3,1) Conv2d over (T, H·W): same sums, and the
    2D kernels are much faster on CPU. x (B, C, T, H, W) (any strides; channels-last-3d stays
    channels-last), weight (N, C, 3, 1, 1), bias (N,) or None → y (B, N, T, H, W)."""
    b, c, t, h, w = x.shape
    if x.stride(3) == w * x.stride(4):
        # explicit strides: flatten() may rewrite a size-1 batch's stride, which makes a
        # channels-last input look channels-first to the convolution
        x4 = x.as_strided((b, c, t, h * w), (*x.stride()[:3], x.stride(4)))
    else:
        x4 = x.flatten(3)
    y = F.conv2d(x4, weight.view(*weight.shape[:3], 1), bias, padding=(1, 0))
    return y.unflatten(3, (h, w))


def temporal_conv_gemms(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A (3,1,1) Conv3d with padding (1,0,0) as three GEMMs, no temporaries.

    x (B, C, T, H, W) channels-last-3d (its tokens (B, T·H·W, C) contiguous), weight
    (N, C, 3, 1, 1), bias (N,) or None → y (B, N, T, H, W) channels-last-3d: the centre tap (and
    the bias) by one ``addmm`` into y, then the previous and next frames' taps by ``baddbmm_``
    into y's token rows shifted by H·W (each batch element's first and last frames get no
    neighbour, as the zero padding gives). Each product is rounded to y's dtype before the next
    adds to it (three roundings where a convolution has one)."""
    b, c, t, h, w = x.shape
    hw = h * w
    tokens = x.permute(0, 2, 3, 4, 1).view(b, t * hw, c)
    taps = weight.view(weight.shape[0], c, 3).permute(2, 1, 0)  # (3, C, N)
    out = torch.empty(b, t * hw, weight.shape[0], dtype=x.dtype, device=x.device)
    flat_out, flat_in = out.view(-1, out.shape[-1]), tokens.reshape(-1, c)
    if bias is None:
        torch.mm(flat_in, taps[1], out=flat_out)
    else:
        torch.addmm(bias, flat_in, taps[1], out=flat_out)
    if t > 1:
        out[:, hw:].baddbmm_(tokens[:, :-hw], taps[0].expand(b, -1, -1))
        out[:, :-hw].baddbmm_(tokens[:, hw:], taps[2].expand(b, -1, -1))
    return out.view(b, t, h, w, -1).permute(0, 4, 1, 2, 3)


class GEGLU(nn.Module):
    """``x·gelu(gate)`` where ``[x, gate] = proj(input)`` (key ``proj``), through
    :func:`echofast.ops.geglu` (one fused Triton pass on CUDA; in place on CPU without autograd),
    or :func:`echofast.ops.geglu_linear` (projection and gate in one GEMM) on
    :data:`FUSED_GEGLU_DEVICES`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in FUSED_GEGLU_DEVICES and eager_inference():
            return ops.geglu_linear(x, self.proj.weight, self.proj.bias)
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU (dim → 4·dim) then Linear (→ dim_out); keys ``net.0.proj``, ``net.2``. One kernel
    (:func:`echofast.ops.feed_forward`) on :data:`FUSED_FF_DEVICES` up to
    :data:`FUSED_FF_MAX_DIM` wide."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList(
            [GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim_out or dim)]
        )

    def _fused(self, x: torch.Tensor) -> bool:
        return (
            x.device.type in FUSED_FF_DEVICES
            and x.shape[-1] <= FUSED_FF_MAX_DIM
            and eager_inference()
            and ops.feed_forward_supported(x, self.net[0].proj.weight, self.net[2].weight)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            proj, out = self.net[0].proj, self.net[2]
            return ops.feed_forward(x, proj.weight, proj.bias, out.weight, out.bias)
        return self.net[2](self.net[1](self.net[0](x)))

    @property
    def out_bias(self) -> torch.Tensor | None:
        """The output Linear's bias: what :meth:`add_to`'s caller has added to h already."""
        return self.net[2].bias

    def add_to(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h += self(x) - out_bias`` in place (eager inference; h (..., dim_out) contiguous,
        already holding the output bias): the output Linear's GEMM accumulates into h
        (``addmm_``, beta = 1), so the residual add costs no kernel of its own; on
        :data:`FUSED_FF_DEVICES` the one feed-forward kernel reads and writes h."""
        if self._fused(x):
            proj = self.net[0].proj
            w2 = self.net[2].weight
            return ops.feed_forward(x, proj.weight, proj.bias, w2, None, residual=h, out=h)
        g = self.net[1](self.net[0](x))
        w = self.net[2].weight
        w = w if w.dtype == g.dtype else w.to(g.dtype)  # autocast's cast of an fp32 weight
        h.view(-1, h.shape[-1]).addmm_(g.view(-1, g.shape[-1]), w.t())
        return h


def _cross_attend(
    attn: Attention,
    norm: LayerNorm,
    x: torch.Tensor,
    context: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + attn(norm(x), context)`` for tokens x (B, N, C) of B videos; context (B, L, D).
    ``rows``: (B, C) ``attn.single_key(context)`` computed beforehand (single-token contexts)."""
    if context.shape[1] == 1:
        # softmax over one key is 1: the output is to_out(to_v(context)) whatever the queries are
        return _add(x, attn(x, context) if rows is None else rows[:, None])
    return _add(attn(norm(x), context), x)


def _fused_inference(x: torch.Tensor) -> bool:
    """Whether the blocks fuse their residual adds into other ops (a transformer block's into
    the LayerNorm that follows, :meth:`LayerNorm.add_forward`; a resblock's with its
    convolutions' biases, :func:`echofast.ops.bias_residual`): in eager inference, except where
    CPU inference runs the residual branches on chunks (:func:`_residual`) and its convolutions
    add their biases for free."""
    return eager_inference() and (x.device.type != "cpu" or CPU_CHUNK_BYTES <= 0)


def _attend_and_norm(
    attn: Attention,
    norm: LayerNorm,
    next_norm: LayerNorm,
    x: torch.Tensor,
    branch: torch.Tensor,
    context: torch.Tensor,
    rows: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused form of ``x = x + branch; x = _cross_attend(attn, norm, x, context, rows)`` and
    ``next_norm(x)``: returns (x + shift, next_norm(x)) for tokens x (B·M, N, C) of B videos and
    a fresh ``branch`` of x's shape (overwritten). With one context token the cross-attention's
    output is one row per video (``rows``, or computed here), added in the same pass as the
    branch."""
    b, c = context.shape[0], x.shape[-1]
    if context.shape[1] == 1:
        # softmax over one key is 1: one output row per video, whatever the queries
        if rows is None:
            rows = attn.single_key(context)[:, 0]
        return next_norm.add_forward(x, branch, add=rows, shift=shift)
    h, y = norm.add_forward(x, branch)
    return next_norm.add_forward(h, attn(y.view(b, -1, c), context).view(h.shape), shift=shift)


class SpatialTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` (LayerNorm, GEGLU, no attention bias).

    Self-attention over each frame's H·W tokens, cross-attention to the video's context,
    feed-forward; keys norm1/attn1, norm2/attn2, norm3/ff.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim
        )
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B·T, S, C) frame tokens, context (B, L, D) → (B·T, S, C); ``rows``: (B, C)
        ``attn2.single_key(context)`` computed beforehand, or None."""
        bt, s, c = x.shape
        if _fused_inference(x):
            branch = self.attn1(self.norm1(x))
            h, y = _attend_and_norm(
                self.attn2, self.norm2, self.norm3, x, branch, context, rows, self.ff.out_bias
            )
            return self.ff.add_to(h, y)
        x = _residual(x, lambda v: self.attn1(self.norm1(v)), inplace=False)
        x = _cross_attend(self.attn2, self.norm2, x.view(context.shape[0], -1, c), context, rows)
        return _residual(x.view(bt, s, c), lambda v: self.ff(self.norm3(v)), inplace=True)


class TemporalTransformerBlock(nn.Module):
    """diffusers' ``TemporalBasicTransformerBlock`` with ``time_mix_inner_dim == dim``.

    On (B·S, T, C) sequences (one per spatial position): ``x + ff_in(norm_in(x))``, then
    self-attention over the T frames, cross-attention to the context, feed-forward.
    Keys norm_in/ff_in, norm1/attn1, norm2/attn2, norm3/ff.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        super().__init__()
        self.norm_in = LayerNorm(dim)
        self.ff_in = FeedForward(dim, dim_out=dim)
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim
        )
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B·S, T, C) sequences over frames, context (B, L, D) → (B·S, T, C); ``rows``: (B, C)
        ``attn2.single_key(context)`` computed beforehand, or None."""
        n, t, c = x.shape
        if _fused_inference(x):
            h, y = self.norm1.add_forward(x, self.ff_in(self.norm_in(x)))
            h, y = _attend_and_norm(
                self.attn2,
                self.norm2,
                self.norm3,
                h,
                self.attn1(y),
                context,
                rows,
                self.ff.out_bias,
            )
            return self.ff.add_to(h, y)
        x = _residual(x, lambda v: self.ff_in(self.norm_in(v)), inplace=False)
        x = _residual(x, lambda v: self.attn1(self.norm1(v)), inplace=True)
        x = _cross_attend(self.attn2, self.norm2, x.view(context.shape[0], -1, c), context, rows)
        return _residual(x.view(n, t, c), lambda v: self.ff(self.norm3(v)), inplace=True)

    def forward_frames(
        self,
        tok: torch.Tensor,
        pos: torch.Tensor,
        num_frames: int,
        context: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block on frame-major tokens (eager inference, fused ops): tok (B·T, S, C) (not
        modified) plus the frame-position embedding pos (T, C) → (B·T, S, C), the values
        :meth:`forward` gives on the (B·S, T, C) sequences of ``tok + pos``, without the
        transposed copies: ``tok + pos`` is added by norm_in as it reads tok, the attention
        runs along the frames in place (:meth:`Attention.along_frames`), and everything else
        is per token."""
        bt, s, c = tok.shape
        x, y = self.norm_in.add_forward(tok, None, add=pos, add_group=s)  # x = tok + pos
        h, y = self.norm1.add_forward(x, self.ff_in(y))
        branch = self.attn1.along_frames(y.view(bt // num_frames, num_frames, s, c))
        h, y = _attend_and_norm(
            self.attn2,
            self.norm2,
            self.norm3,
            h,
            branch.view(h.shape),
            context,
            rows,
            self.ff.out_bias,
        )
        return self.ff.add_to(h, y)


class AlphaBlender(nn.Module):
    """Learned mix ``a·spatial + (1 - a)·temporal`` with ``a = sigmoid(mix_factor)``.

    diffusers' ``AlphaBlender(merge_strategy="learned_with_images")`` with an all-zero
    ``image_only_indicator`` (videos only), which is what its UNet always passes.
    """

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def temporal_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``1 - a`` as a (1,) tensor of ``dtype`` (rounded like diffusers: a in dtype first)."""
        return 1.0 - torch.sigmoid(self.mix_factor).to(dtype)


class MixWeights:
    """Every :class:`AlphaBlender`'s ``1 - a`` of a model from one computation.

    The blenders' ``mix_factor`` parameters are stored as adjacent elements of one tensor
    (:mod:`echofast.nn._packing`), so one sigmoid, cast and subtraction give all of them (3
    kernels per UNet call instead of 3 per blender: 114 → 3 for the LVDM); each blender reads its
    element as a view, with exactly :meth:`AlphaBlender.temporal_weight`'s rounding. Inference
    only; otherwise (and when the parameters are not packed) :meth:`compute` returns None.
    """

    def __init__(self, blenders: list[AlphaBlender]):
        self.blenders = blenders

    def pack(self) -> None:
        if len(self.blenders) > 1:
            pack_rows([b.mix_factor for b in self.blenders])

    @property
    def width(self) -> int:
        """The number of blenders: :meth:`all`'s length."""
        return len(self.blenders)

    def _packed(self) -> bool:
        params = [b.mix_factor for b in self.blenders]
        return len(params) > 1 and eager_inference() and adjacent(params)

    def all(self, dtype: torch.dtype) -> torch.Tensor:
        """(n,) every blender's ``1 - a`` in ``dtype``, in order: one computation when packed,
        else one per blender (same rounding). Split by :meth:`split`."""
        if self._packed():
            return 1.0 - torch.sigmoid(concat_view([b.mix_factor for b in self.blenders])).to(dtype)
        if not self.blenders:
            return torch.zeros(0, dtype=dtype)
        return torch.cat([b.temporal_weight(dtype) for b in self.blenders])

    def split(self, weights: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """{blender: its (1,) element of ``weights`` (n,)} as views."""
        return dict(zip(self.blenders, weights.split(1)))

    def compute(self, dtype: torch.dtype) -> dict[nn.Module, torch.Tensor] | None:
        """{blender: its (1,) ``1 - a`` in ``dtype``} as views of one tensor, or None."""
        return self.split(self.all(dtype)) if self._packed() else None


def _temporal_weight(
    temb: torch.Tensor | TimeEmbedding | None, blender: AlphaBlender, dtype: torch.dtype
) -> torch.Tensor:
    if isinstance(temb, TimeEmbedding):
        return temb.temporal_weight(blender, dtype)
    return blender.temporal_weight(dtype)


# ---- resnets --------------------------------------------------------------------------------


class TemporalResnetBlock(nn.Module):
    """diffusers' ``TemporalResnetBlock``: GN+SiLU, Conv3d (3,1,1), +temb, GN+SiLU, Conv3d.

    Works on (B, C, T, H, W); GroupNorm statistics span each group's channels over all T·H·W.
    Returns the residual branch only (the caller adds or mixes the input).
    """

    def __init__(self, channels: int, temb_channels: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(GROUPS, channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.time_emb_proj = nn.Linear(temb_channels, channels)
        self.norm2 = GroupNorm(GROUPS, channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def time_fold(self) -> nn.Conv3d | None:
        """conv1, whose bias is folded into the time projection (see ``project_time``)."""
        return self.conv1 if self.conv1.bias is not None else None

    @staticmethod
    def _conv(conv: nn.Conv3d, x: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        b = conv.bias if bias else None
        if (
            x.device.type in TEMPORAL_GEMMS_DEVICES
            and x.shape[1] <= TEMPORAL_GEMMS_MAX_DIM
            and not torch.is_grad_enabled()
            and x.permute(0, 2, 3, 4, 1).is_contiguous()
        ):
            return temporal_conv_gemms(x, conv.weight, b)
        return temporal_conv2d(x, conv.weight, b)

    def branch(
        self, x: torch.Tensor, temb: torch.Tensor | TimeEmbedding, *, conv2_bias: bool = True
    ) -> torch.Tensor:
        """x (B, C, T, H, W) (any strides), temb (B, E) → residual branch (B, C, T, H, W),
        without conv2's bias when ``conv2_bias`` is False (the caller adds it)."""
        fold = self.time_fold()
        h = self._conv(self.conv1, self.norm1(x), bias=fold is None)
        # + the time projection (B, C) and conv1's bias, added by norm2 as it reads h
        h = self.norm2(h, add=project_time(temb, self.time_emb_proj, fold))
        return self._conv(self.conv2, self.dropout(h), bias=conv2_bias)


class SpatioTemporalResBlock(nn.Module):
    """diffusers' ``SpatioTemporalResBlock``: a 2D resnet per frame, then a temporal resnet
    mixed in by an :class:`AlphaBlender`. Keys spatial_res_block, temporal_res_block, time_mixer.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, eps: float):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(
            in_channels, out_channels, temb_channels=temb_channels, eps=eps
        )
        self.temporal_res_block = TemporalResnetBlock(out_channels, temb_channels, eps)
        self.time_mixer = AlphaBlender(0.5)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | TimeEmbedding, num_frames: int
    ) -> torch.Tensor:
        """x (B·T, C_in, H, W), temb (B, E) → (B·T, C_out, H, W)."""
        sp = self.spatial_res_block
        b = x.shape[0] // num_frames
        fold = sp.time_fold()
        h = conv_without_bias(sp.conv1, sp.norm1(x)) if fold else sp.conv1(sp.norm1(x))
        bt, c, hh, ww = h.shape
        # + the video's time projection (B, C) and conv1's bias on each of its frames, added by
        # norm2 as it reads h
        h = sp.dropout(sp.norm2(h, add=project_time(temb, sp.time_emb_proj, fold)))
        if _fused_inference(x):
            return self._fused_epilogues(x, h, temb, num_frames)
        h = sp.conv2(h)
        s = _add(h, x if sp.conv_shortcut is None else sp.conv_shortcut(x))
        # temporal: s + (1 - a)·branch(s), computed on the (B, C, T, H, W) view of s
        s5 = s.view(b, num_frames, c, hh, ww).transpose(1, 2)
        g = self.temporal_res_block.branch(s5, temb)
        w = _temporal_weight(temb, self.time_mixer, s.dtype)
        if not eager_inference():
            return (s5 + g * w).transpose(1, 2).reshape(bt, c, hh, ww)
        s5.addcmul_(g, w)
        return s

    def _fused_epilogues(
        self, x: torch.Tensor, h: torch.Tensor, temb: torch.Tensor | TimeEmbedding, num_frames: int
    ) -> torch.Tensor:
        """The rest of :meth:`forward` from norm2's output h, with the convolutions run without
        their biases and each epilogue one op (:func:`echofast.ops.bias_residual`):
        ``s = conv2(h) + b2 + x`` (or ``+ shortcut(x) + b_sc``), then
        ``s += (1 - a)·(temporal branch + its conv2 bias)``."""
        sp, tb = self.spatial_res_block, self.temporal_res_block
        y = conv_without_bias(sp.conv2, h)
        bt, c, hh, ww = y.shape
        if sp.conv_shortcut is None:
            s = ops.bias_residual(y, residual=x, bias=sp.conv2.bias, out=y)
        else:
            sc = sp.conv_shortcut
            r = conv_without_bias(sc, x)
            s = ops.bias_residual(y, residual=r, bias=sp.conv2.bias, bias2=sc.bias, out=y)
        s5 = s.view(bt // num_frames, num_frames, c, hh, ww).transpose(1, 2)
        g = tb.branch(s5, temb, conv2_bias=False)
        w = _temporal_weight(temb, self.time_mixer, s.dtype)
        ops.bias_residual(g, residual=s5, bias=tb.conv2.bias, weight=w, out=s5)
        return s


# ---- transformer model ----------------------------------------------------------------------


class TransformerSpatioTemporalModel(nn.Module):
    """diffusers' ``TransformerSpatioTemporalModel``: GroupNorm, proj_in, then per layer a spatial
    block and a temporal block (on spatial output + frame-position embedding) mixed by an
    :class:`AlphaBlender`; proj_out and a residual connection.
    """

    def __init__(
        self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int
    ):
        super().__init__()
        inner = heads * dim_head
        if inner != in_channels:
            raise ValueError(f"heads·dim_head = {inner} must equal in_channels = {in_channels}")
        self.in_channels = in_channels
        self.norm = GroupNorm(GROUPS, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            SpatialTransformerBlock(inner, heads, dim_head, cross_attention_dim)
            for _ in range(num_layers)
        )
        self.temporal_transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, heads, dim_head, cross_attention_dim)
            for _ in range(num_layers)
        )
        self.time_pos_embed = TimestepEmbedding(in_channels, 4 * in_channels, out_dim=in_channels)
        self.time_mixer = AlphaBlender(0.5)
        self.proj_out = nn.Linear(inner, in_channels)

    def frame_embedding(
        self,
        num_frames: int,
        device: torch.device,
        dtype: torch.dtype,
        temb: TimeEmbedding | None = None,
    ) -> torch.Tensor:
        """Frame-position embedding (T, C) of frames 0..T-1 (the sinusoidal features, which depend
        only on T and C, shared by the call's transformers through ``temb``)."""

        def features() -> torch.Tensor:
            pos = torch.arange(num_frames, device=device)
            feats = timestep_features(pos, self.in_channels, flip_sin_to_cos=True, freq_shift=0)
            return feats.to(dtype)

        key = ("frame-features", num_frames, self.in_channels, device, dtype)
        feats = temb.per_call(key, features) if temb is not None else features()
        return self.time_pos_embed(feats)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        num_frames: int,
        temb: TimeEmbedding | None = None,
    ) -> torch.Tensor:
        """x (B·T, C, H, W), context (B, L, D) → (B·T, C, H, W).

        ``temb``: the call's :class:`TimeEmbedding`: the frame embedding (which depends only on T
        and the weights) and the cross-attentions' single-key rows when the caller precomputed
        them (:meth:`TimeEmbedding.feature`), else within a sampling run its memo computes the
        frame embedding once per run; its mix weights come from the model's one computation
        (:class:`MixWeights`).
        """
        memo = temb.memo if temb is not None else None
        bt, c, hh, ww = x.shape
        b, t, s = context.shape[0], num_frames, hh * ww
        # (B·T, C, H, W) → (B·T, H·W, C) tokens: a view when x is channels-last
        tok = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bt, s, c))
        pos = _feature(temb, self)
        if pos is None:
            pos = (memo or RunMemo(enabled=False)).get(
                (self.time_pos_embed,),
                ("frames", t, x.device, tok.dtype),
                lambda: self.frame_embedding(t, x.device, tok.dtype, temb),
            )
        w = _temporal_weight(temb, self.time_mixer, tok.dtype)
        for spatial, temporal in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            tok = spatial(tok, context, _feature(temb, spatial.attn2))  # (B·T, S, C)
            if _fused_inference(tok):
                # frame-major throughout: no transposed copies (same values)
                seq = temporal.forward_frames(tok, pos, t, context, _feature(temb, temporal.attn2))
                tok = tok.lerp_(seq.view(tok.shape), w)
                continue
            seq = _to_sequences(tok.view(b, t, s, c), pos)  # (B·S, T, C)
            seq = temporal(seq, context, _feature(temb, temporal.attn2))
            seq = seq.view(b, s, t, c).transpose(1, 2)  # (B, T, S, C) view
            # a·spatial + (1 - a)·temporal, reading the temporal output through a view
            if not eager_inference():
                tok = torch.lerp(tok.view(b, t, s, c), seq, w).reshape(bt, s, c)
            else:
                tok = tok.view(b, t, s, c).lerp_(seq, w).view(bt, s, c)
        out = self.proj_out(tok).view(bt, hh, ww, c).permute(0, 3, 1, 2)  # channels-last view
        return x + out


def _to_sequences(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, T, S, C) tokens + (T, C) → (B·S, T, C) contiguous per-position sequences, one pass."""
    b, t, s, c = tok.shape
    if not eager_inference():
        return (tok + pos[:, None]).transpose(1, 2).reshape(b * s, t, c)
    seq = tok.new_empty(b, s, t, c)
    torch.add(tok, pos[:, None], out=seq.transpose(1, 2))
    return seq.view(b * s, t, c)


# ---- UNet stages ----------------------------------------------------------------------------


def _feature(temb: TimeEmbedding | None, module: nn.Module) -> torch.Tensor | None:
    return temb.feature(module) if temb is not None else None


def _call_time(temb: torch.Tensor | TimeEmbedding) -> TimeEmbedding | None:
    return temb if isinstance(temb, TimeEmbedding) else None


class SpatioTemporalDownStage(nn.Module):
    """``DownBlockSpatioTemporal`` (``heads=None``) or ``CrossAttnDownBlockSpatioTemporal``:
    resnets (each followed by a spatio-temporal transformer when attending), then an optional
    stride-2 conv. ``forward`` returns ``(x, skips)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        downsample: bool,
        heads: int | None = None,
        transformer_layers: int = 1,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        eps = 1e-5 if heads is None else 1e-6
        self.resnets = nn.ModuleList(
            SpatioTemporalResBlock(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, eps
            )
            for i in range(num_layers)
        )
        self.attentions = None
        if heads is not None:
            self.attentions = nn.ModuleList(
                TransformerSpatioTemporalModel(
                    heads,
                    out_channels // heads,
                    out_channels,
                    transformer_layers,
                    cross_attention_dim,
                )
                for _ in range(num_layers)
            )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=1)])
            if downsample
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | TimeEmbedding,
        context: torch.Tensor,
        num_frames: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames, _call_time(temb))
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class SpatioTemporalMidStage(nn.Module):
    """``UNetMidBlockSpatioTemporal``: resnet, then (transformer, resnet); eps 1e-5."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        heads: int,
        transformer_layers: int,
        cross_attention_dim: int,
    ):
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                TransformerSpatioTemporalModel(
                    heads, channels // heads, channels, transformer_layers, cross_attention_dim
                )
            ]
        )
        self.resnets = nn.ModuleList(
            SpatioTemporalResBlock(channels, channels, temb_channels, 1e-5) for _ in range(2)
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | TimeEmbedding,
        context: torch.Tensor,
        num_frames: int,
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb, num_frames)
        x = self.attentions[0](x, context, num_frames, _call_time(temb))
        return self.resnets[1](x, temb, num_frames)


class SpatioTemporalUpStage(nn.Module):
    """``UpBlockSpatioTemporal`` (``heads=None``) or ``CrossAttnUpBlockSpatioTemporal``:
    per layer, concatenate a skip and run a resnet (eps 1e-6) (+ transformer); then an optional
    nearest upsampling + conv to ``upsample_size`` (or 2×).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        upsample: bool,
        heads: int | None = None,
        transformer_layers: int = 1,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            cin = prev_output_channels if i == 0 else out_channels
            self.resnets.append(
                SpatioTemporalResBlock(cin + skip, out_channels, temb_channels, 1e-6)
            )
        self.attentions = None
        if heads is not None:
            self.attentions = nn.ModuleList(
                TransformerSpatioTemporalModel(
                    heads,
                    out_channels // heads,
                    out_channels,
                    transformer_layers,
                    cross_attention_dim,
                )
                for _ in range(num_layers)
            )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if upsample else None
        )

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        temb: torch.Tensor | TimeEmbedding,
        context: torch.Tensor,
        num_frames: int,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, num_frames, _call_time(temb))
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
