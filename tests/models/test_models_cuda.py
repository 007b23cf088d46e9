"""The real EchoNet-Synthetic VAE, LIDM and LVDM on CUDA against diffusers on the same GPU.

tests/models/test_{vae,lidm,lvdm}.py compare echofast with diffusers on CPU, where automatic
dispatch picks the PyTorch backends. On CUDA the models run other code: the Triton
GroupNorm(+SiLU) kernels, Triton / xformers / SDPA attention, the fused QKV projection
(``echofast.nn.attention.FUSED_QKV_DEVICES``), cuDNN convolutions. Here each model is built
with diffusers' real config (``support.configs``), random weights, random norm affine parameters
(and, for the LVDM, random AlphaBlender mix factors), saved and loaded by ``from_pretrained``
onto the GPU, and run at small sizes:

* fp32, TF32 off, automatic dispatch: relative max error <= 1e-4 against diffusers; the GPU
  kernels must be the ones that ran (no op fell back to its plain-PyTorch reference);
* fp16 / bf16 the way echofast runs them (autocast with fp32 weights for the UNets and the VAE
  decode, weights in the dtype for ``echofast encode --dtype``) against the fp32 diffusers output:
  error <= 2x diffusers' own error under autocast (the reference's way) + half an ulp;
* every op forced to its ``torch`` backend equals automatic dispatch within 1e-4 (the GPU kernels
  compute the reference function inside the real model);
* gradients of a small LVDM (training runs these paths): every parameter's within 1e-3.

The checks are plain functions of ``device`` (on CPU they run in fp32, which is how their logic
was checked without a GPU); the tests call them with ``"cuda"``. (The pipelines' Triton
``window_step`` is not a model op: tests/ops/test_window_step_cuda.py covers it.)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.configs import (
    LIDM_FULL_CONFIG,
    LVDM_FULL_CONFIG,
    LVDM_SMALL_CONFIG,
    VAE_FULL_CONFIG,
)
from support.models import build_diffusers, rel_err

import echofast.nn.attention as attention_nn
from echofast.models import LIDM, LVDM, VAE
from echofast.nn import Attention
from echofast.nn.embeddings import sampling_cache
from echofast.ops import registered_ops, use_backend
from echofast.ops._dispatch import Op
from echofast.pipelines.common import unet_precision

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y"),
        reason="TRITON_INTERPRET is set: these tests are for the compiled Triton kernels",
    ),
]

FP32_TOL = 1e-4
GRAD_TOL = 1e-3
REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (config, diffusers class, echofast class, seed)
MODELS = {
    "vae": (VAE_FULL_CONFIG, "AutoencoderKL", VAE, 0),
    "lidm": (LIDM_FULL_CONFIG, "UNet2DModel", LIDM, 1),
    "lvdm": (LVDM_FULL_CONFIG, "UNetSpatioTemporalConditionModel", LVDM, 2),
    "lvdm-small": (LVDM_SMALL_CONFIG, "UNetSpatioTemporalConditionModel", LVDM, 3),
}

#: what is compared: VAE encode (posterior mean and std) and decode, one LIDM call, one LVDM call
#: with the full 8-channel input and one with the pipeline's precomputed conditioning features
TARGETS = ("vae-encode", "vae-decode", "lidm", "lvdm", "lvdm-split")
#: reduced precision: the LVDM as the pipeline calls it (conditioning features in fp32)
REDUCED_TARGETS = ("vae-encode", "vae-decode", "lidm", "lvdm-split")


# ---- models ------------------------------------------------------------------------------------


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_reference(kind: str) -> torch.nn.Module:
    """The diffusers model of ``kind`` on CPU: seeded random weights, random norm affine
    parameters and, for the LVDM, random AlphaBlender mix factors (default init hides bugs)."""
    config, cls_name, _, seed = MODELS[kind]
    model = build_diffusers(_diffusers_class(cls_name), config, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


class ModelPairs:
    """(diffusers, echofast) models of each kind on ``device``, built on first use: the diffusers
    model is saved to ``folder/<kind>`` and echofast's loaded from there by ``from_pretrained``."""

    def __init__(self, device: str | torch.device, folder: Path):
        self.device = torch.device(device)
        self.folder = Path(folder)
        self._pairs: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def __call__(self, kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        if kind not in self._pairs:
            ref = build_reference(kind)
            ref.save_pretrained(self.folder / kind)
            ours = MODELS[kind][2].from_pretrained(self.folder / kind, device=self.device)
            self._pairs[kind] = (ref.to(self.device), ours)
        return self._pairs[kind]

    def load(self, kind: str, dtype: torch.dtype) -> torch.nn.Module:
        """A second echofast copy of ``kind`` with weights in ``dtype`` (``from_pretrained``)."""
        self(kind)
        return MODELS[kind][2].from_pretrained(self.folder / kind, device=self.device, dtype=dtype)


# ---- inputs and calls --------------------------------------------------------------------------


def make_inputs(target: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Inputs of ``target`` at the real latent sizes: 2 images of 3x112x112 or latents of
    4x14x14; 2 LIDM latents of 16x16 (14 padded); 2 LVDM windows of 16 frames of 16x16 with a
    frame-constant conditioning latent, EF in [0.1, 0.9], t = 945 (the first sampling step)."""
    g = torch.Generator().manual_seed(sum(map(ord, target)))
    if target == "vae-encode":
        inp = {"x": torch.rand(2, 3, 112, 112, generator=g) * 2 - 1}
    elif target == "vae-decode":
        inp = {"z": torch.randn(2, 4, 14, 14, generator=g)}
    elif target == "lidm":
        inp = {"x": torch.randn(2, 4, 16, 16, generator=g), "t": torch.tensor(945)}
    else:
        noisy = torch.randn(2, 16, 4, 16, 16, generator=g)
        cond = torch.randn(2, 4, 16, 16, generator=g)
        inp = {
            "noisy": noisy,
            "cond": cond,
            "x": torch.cat([noisy, cond[:, None].expand(-1, 16, -1, -1, -1)], dim=2),
            "t": torch.tensor(945),
            "ehs": 0.1 + 0.8 * torch.rand(2, 1, 1, generator=g),
            "ids": torch.randn(2, 1, generator=g),
        }
    return {k: v.to(device) for k, v in inp.items()}


def run_diffusers(target: str, model: torch.nn.Module, inp: dict) -> tuple[torch.Tensor, ...]:
    """diffusers' outputs of ``target`` (float32)."""
    with torch.no_grad():
        if target == "vae-encode":
            dist = model.encode(inp["x"]).latent_dist
            out = (dist.mean, dist.std)
        elif target == "vae-decode":
            out = (model.decode(inp["z"]).sample,)
        elif target == "lidm":
            out = (model(inp["x"], inp["t"]).sample,)
        else:
            out = (model(inp["x"], inp["t"], inp["ehs"], inp["ids"]).sample,)
    return tuple(o.float() for o in out)


def run_echofast(target: str, model: torch.nn.Module, inp: dict) -> tuple[torch.Tensor, ...]:
    """echofast's outputs of ``target`` (float32), in the weights' dtype (no autocast)."""
    with torch.no_grad():
        if target == "vae-encode":
            dist = model.encode(inp["x"].to(model.dtype)).latent_dist
            out = (dist.mean, dist.std)
        elif target == "vae-decode":
            out = (model.decode(inp["z"]).sample,)
        elif target == "lidm":
            out = (model(inp["x"], inp["t"]).sample,)
        elif target == "lvdm":
            out = (model(inp["x"], inp["t"], inp["ehs"], inp["ids"]).sample,)
        else:
            feats = model.conditioning_features(inp["cond"])
            out = (
                model(inp["noisy"], inp["t"], inp["ehs"], inp["ids"], conditioning=feats).sample,
            )
    return tuple(o.float() for o in out)


def run_echofast_reduced(
    target: str, pairs: ModelPairs, inp: dict, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """echofast in ``dtype`` as the package runs it: ``echofast encode --dtype`` loads the VAE
    with weights in the dtype (``VAE.from_pretrained(dtype=)``); ``LVDMPipeline.decode`` decodes
    under autocast; the LIDM / LVDM pipelines call the UNet under autocast with fp32 weights
    (``unet_precision``) inside the sampling cache, the LVDM with its conditioning features
    computed once in fp32, outside autocast."""
    device = pairs.device
    if target == "vae-encode":
        return run_echofast(target, pairs.load("vae", dtype), inp)
    _, ours = pairs(target.split("-")[0])
    with torch.no_grad(), sampling_cache(ours):
        feats = ours.conditioning_features(inp["cond"]) if target == "lvdm-split" else None
        with unet_precision(device, dtype):
            if target == "vae-decode":
                out = ours.decode(inp["z"]).sample
            elif target == "lidm":
                out = ours(inp["x"], inp["t"]).sample
            else:
                out = ours(inp["noisy"], inp["t"], inp["ehs"], inp["ids"], conditioning=feats)
                out = out.sample
    return (out.float(),)


def max_rel_err(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float:
    """Largest ``rel_err`` (max |a - b| / max |b|) over the outputs."""
    assert len(got) == len(ref) and all(a.shape == b.shape for a, b in zip(got, ref))
    return max(rel_err(a, b) for a, b in zip(got, ref))


def all_finite(out: tuple[torch.Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(o).all()) for o in out)


# ---- backends ----------------------------------------------------------------------------------


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, Counter]]:
    """Count, per op, the backends dispatch selects inside the block (wraps ``Op.select``)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    original = Op.select

    def select(self, *args, **kwargs):
        chosen = original(self, *args, **kwargs)
        seen[self.name][chosen.name] += 1
        return chosen

    Op.select = select
    try:
        yield seen
    finally:
        Op.select = original


def describe(seen: dict[str, Counter]) -> str:
    return "; ".join(
        f"{op}: " + ", ".join(f"{b} x{n}" for b, n in sorted(c.items()))
        for op, c in sorted(seen.items())
    )


def _reset_attention_records(model: torch.nn.Module) -> list[Attention]:
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attns:
        a.last_path = a.last_qkv = ""
    return attns


def gpu_kernel_problems(
    device: torch.device, seen: dict[str, Counter], attns: list[Attention]
) -> list[str]:
    """On CUDA, what in a run's record is not the GPU path this module tests: GroupNorm must run
    the Triton kernels, no op may fall back to its plain-PyTorch reference, and self-attention
    must project Q, K, V with one GEMM (on ``FUSED_QKV_DEVICES``). Elsewhere nothing."""
    if device.type != "cuda":
        return []
    problems = []
    if set(seen.get("group_norm", {})) != {"triton"}:
        problems.append(f"group_norm did not run (only) triton: {dict(seen.get('group_norm', {}))}")
    problems += [f"{op} fell back to the torch reference" for op, c in seen.items() if "torch" in c]
    if device.type in attention_nn.FUSED_QKV_DEVICES:
        unfused = sum(
            a.is_self_attention and a.last_path == "general" and a.last_qkv != "fused"
            for a in attns
        )
        if unfused:
            problems.append(f"{unfused} self-attention module(s) did not use the fused QKV GEMM")
    return problems


def check_gpu_kernels_ran(
    device: torch.device, seen: dict[str, Counter], attns: list[Attention]
) -> None:
    problems = gpu_kernel_problems(device, seen, attns)
    if problems:
        reasons = {name: op.report(device.type) for name, op in registered_ops().items()}
        raise AssertionError(f"{problems}; ran: {describe(seen)}; backend reasons: {reasons}")


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """cuBLAS and cuDNN in IEEE fp32 inside the block, the previous settings restored after.

    PyTorch lets cuDNN convolutions use TF32 by default (``cudnn.allow_tf32 = True``; matmuls
    follow ``cuda.matmul.allow_tf32``). TF32 keeps 10 mantissa bits, so two fp32 runs that pick
    different algorithms (echofast's channels_last convolutions vs diffusers' NCHW ones) would
    differ by ~1e-3, far above the 1e-4 that a faithful fp32 implementation meets; the fp32 and
    forced-backend checks therefore need IEEE fp32, and the reduced-precision checks need an
    exact fp32 reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _require_ieee_fp32(device: torch.device) -> None:
    if device.type == "cuda":
        assert not torch.backends.cuda.matmul.allow_tf32, "run inside tf32_off()"
        assert not torch.backends.cudnn.allow_tf32, "run inside tf32_off()"


# ---- checks ------------------------------------------------------------------------------------


def check_fp32(target: str, pairs: ModelPairs) -> dict:
    """Automatic dispatch in fp32 vs diffusers fp32 on the same device: rel max err <= 1e-4."""
    device = pairs.device
    _require_ieee_fp32(device)
    ref, ours = pairs(target.split("-")[0])
    inp = make_inputs(target, device)
    expected = run_diffusers(target, ref, inp)
    attns = _reset_attention_records(ours)
    with record_backends() as seen:
        got = run_echofast(target, ours, inp)
    err = max_rel_err(got, expected)
    assert err <= FP32_TOL, (
        f"{target} fp32 on {device}: rel err {err:.3g} > {FP32_TOL:g}; ran: {describe(seen)}"
    )
    check_gpu_kernels_ran(device, seen, attns)
    return {"err": err, "bound": FP32_TOL, "backends": describe(seen)}


def half_ulp(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Half an ulp of ``dtype`` at max |ref|, relative to max |ref| (at most eps / 2)."""
    top = ref.abs().max().item()
    return torch.finfo(dtype).eps * 2.0 ** (math.frexp(top)[1] - 1) / 2 / top


def check_reduced(target: str, pairs: ModelPairs, dtype: torch.dtype) -> dict:
    """echofast in ``dtype`` (see :func:`run_echofast_reduced`) vs diffusers fp32: each output's
    error at most twice diffusers' own error under ``torch.autocast(dtype)`` with fp32 weights (the
    reference's way) plus half an ulp of its max |ref|; everything finite."""
    device = pairs.device
    _require_ieee_fp32(device)
    ref, _ = pairs(target.split("-")[0])
    inp = make_inputs(target, device)
    expected = run_diffusers(target, ref, inp)
    with torch.autocast(device_type=device.type, dtype=dtype):
        theirs = run_diffusers(target, ref, inp)
    with record_backends() as seen:
        got = run_echofast_reduced(target, pairs, inp, dtype)
    assert all_finite(expected) and all_finite(theirs), f"diffusers' {target} is not finite"
    assert all_finite(got), f"echofast's {target} in {dtype} is not finite; ran: {describe(seen)}"
    errs = [max_rel_err((a,), (e,)) for a, e in zip(got, expected)]
    their_errs = [max_rel_err((a,), (e,)) for a, e in zip(theirs, expected)]
    bounds = [2 * t + half_ulp(dtype, e) for t, e in zip(their_errs, expected)]
    assert all(e <= b for e, b in zip(errs, bounds)), (
        f"{target} {dtype} on {device}: echofast rel err {errs} > bound {bounds} (diffusers under "
        f"autocast: {their_errs}); ran: {describe(seen)}"
    )
    return {"err": errs, "diffusers_err": their_errs, "bound": bounds, "backends": describe(seen)}


def check_forced_torch(target: str, pairs: ModelPairs) -> dict:
    """Every op forced to its plain-PyTorch backend vs automatic dispatch, fp32: <= 1e-4."""
    device = pairs.device
    _require_ieee_fp32(device)
    _, ours = pairs(target.split("-")[0])
    inp = make_inputs(target, device)
    with record_backends() as auto_seen:
        auto = run_echofast(target, ours, inp)
    with record_backends() as forced_seen, use_backend("torch"):
        forced = run_echofast(target, ours, inp)
    assert set(forced_seen) and all(set(c) == {"torch"} for c in forced_seen.values())
    err = max_rel_err(auto, forced)
    assert err <= FP32_TOL, (
        f"{target} on {device}: automatic dispatch ({describe(auto_seen)}) differs from the torch "
        f"backends by rel {err:.3g} > {FP32_TOL:g}"
    )
    return {"err": err, "bound": FP32_TOL, "backends": describe(auto_seen)}


def check_gradients(pairs: ModelPairs, checkpointing: bool = False) -> dict:
    """Small LVDM, fp32, autograd (as training runs it: full 8-channel input, per-sample
    timesteps): loss = (out * w).sum() with a fixed random w; every parameter's gradient (and the
    input's) vs diffusers': max |g - g_ref| <= 1e-3 * max(max |g_ref|, 1e-3 * G), G the largest
    |g_ref| over all parameters. ``checkpointing``: both models with gradient checkpointing on
    (the echofast blocks, Triton kernels included, recomputed in the backward pass).

    Why 1e-3 and not the forward's 1e-4: weight gradients are sums over B·T·H·W products that
    cancel, reduced in other orders by the Triton GroupNorm backward, cuDNN's weight-gradient
    algorithms and diffusers, so their error relative to their own max is larger than an
    activation's; a wrong term would be O(1). The floor 1e-3 * G covers parameters whose true
    gradient is zero: the LVDM's cross-attention has one key, so softmax is constant and its
    norm, to_q and to_k get no gradient (echofast skips them: None; diffusers: rounding noise).
    """
    device = pairs.device
    _require_ieee_fp32(device)
    ref, ours = pairs("lvdm-small")
    g = torch.Generator().manual_seed(11)
    frames = LVDM_SMALL_CONFIG["num_frames"]
    x = torch.randn(2, frames, 8, 16, 16, generator=g).to(device)
    t = torch.tensor([17, 640], device=device)
    ehs = (0.1 + 0.8 * torch.rand(2, 1, 1, generator=g)).to(device)
    ids = torch.zeros(2, 1, device=device)
    w = torch.randn(2, frames, 4, 16, 16, generator=g).to(device)
    grads, records = {}, {}
    for name, model in (("diffusers", ref), ("echofast", ours)):
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        xi = x.clone().requires_grad_(True)
        try:
            with record_backends() as records[name]:
                (model(xi, t, ehs, ids).sample * w).sum().backward()
        finally:
            model.disable_gradient_checkpointing()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
        grads[name]["<input>"] = xi.grad
        model.zero_grad(set_to_none=True)
    theirs, mine, seen = grads["diffusers"], grads["echofast"], records["echofast"]
    assert set(theirs) == set(mine)
    assert all(v is not None for v in theirs.values())
    top = max(v.abs().max().item() for v in theirs.values())
    errs, skipped = {}, []
    for n, gr in theirs.items():
        if mine[n] is None:
            skipped.append(n)
        mi = torch.zeros_like(gr) if mine[n] is None else mine[n]
        scale = max(gr.abs().max().item(), 1e-3 * top)
        errs[n] = (mi.double() - gr.double()).abs().max().item() / scale
    bad = {n: f"{e:.3g}" for n, e in errs.items() if e > GRAD_TOL}
    assert not bad, f"gradients off (rel to max |g_ref|) on {device}: {bad}; ran {describe(seen)}"
    check_gpu_kernels_ran(device, seen, [])
    return {
        "largest": {n: f"{errs[n]:.3g}" for n in sorted(errs, key=errs.get)[-3:]},
        "input": errs["<input>"],
        "bound": GRAD_TOL,
        "none_in_echofast": len(skipped),
        "backends": describe(seen),
    }


# ---- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> ModelPairs:
    return ModelPairs("cuda", tmp_path_factory.mktemp("cuda_models"))


@pytest.fixture(autouse=True)
def ieee_fp32():
    """TF32 off for the test, restored after (see :func:`tf32_off`)."""
    with tf32_off():
        yield


@pytest.mark.parametrize("target", TARGETS)
def test_fp32_auto_dispatch_matches_diffusers(pairs, target):
    check_fp32(target, pairs)


@pytest.mark.parametrize("dtype", list(REDUCED.values()), ids=list(REDUCED))
@pytest.mark.parametrize("target", REDUCED_TARGETS)
def test_reduced_precision_within_twice_diffusers_error(pairs, target, dtype):
    check_reduced(target, pairs, dtype)


@pytest.mark.parametrize("target", TARGETS)
def test_forced_torch_backends_equal_auto_dispatch(pairs, target):
    check_forced_torch(target, pairs)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_lvdm_gradients_match_diffusers(pairs, checkpointing):
    check_gradients(pairs, checkpointing)
