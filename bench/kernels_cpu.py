"""Estimate the GPU kernels per UNet call from a CPU run (no GPU needed).

Counts, during one UNet call on CPU tensors, the ATen ops that launch a kernel on a GPU (views,
allocations and metadata ops excluded) plus echofast's Triton launches, with every op dispatched
the way it is on CUDA: the Triton backends (the kernels are counted, not run: Triton's
interpreter is switched on so that the dispatcher picks them, and its launch is replaced by a
counter, so the call's outputs are meaningless), fused QKV, and GroupNorm's kernel choice and
splits as an H100/H200 plans them for the pipeline's batch-1 call (the channels-last rows
kernels). No sampling memo is active, as in a CUDA-graph replay (the pipelines' eager path
memoises the time embeddings per run and launches fewer).
cuBLAS/cuDNN may launch more than one kernel for one GEMM or convolution: the estimate counts one,
plus one for a convolution's bias (cuDNN adds it in a kernel of its own; CPU convolutions do not).
The GPU benchmark's profiler count (``echofast bench``, column ``kernels``) is the measurement.

Usage::

    python bench/kernels_cpu.py [--config full|small] [--lidm] [--temporal-gemms]
        [--csv bench/results/kernels_cpu.csv]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the dispatcher picks Triton

import torch  # noqa: E402
from benchutil import append_csv, git_sha  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

H100_SMS = 132
"""Multiprocessors of an H100/H200 SXM: the launchers' work split is planned for them."""
BATCH1_SCALE = 5
"""The pipeline's UNet batch at one video (5 windows of 64 frames) over one 64-frame window."""

#: ATen ops that launch no kernel (besides views, which ``OpOverload.is_view`` tells)
NO_KERNEL = {
    "_unsafe_view",
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "lift_fresh",
    "alias",
    "_reshape_alias",
    "set_",
    "resize_",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "is_same_size",
    "_local_scalar_dense",
    "item",
}


class KernelCount(TorchDispatchMode):
    """Counts kernel-launching ATen ops, by name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in NO_KERNEL):
            self.counts["aten." + name] += 1
        if name == "convolution" and args[2] is not None:
            # cuDNN convolutions add their bias in a separate (strided) kernel; CPU's do not
            self.counts["cuda.conv_bias_add"] += 1
        return func(*args, **(kwargs or {}))


def count_triton_launches(counts: collections.Counter):
    """Replace the interpreter's launch by a counter (restored by the returned function)."""
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts["triton." + self.fn.__name__] += 1

    interpreter.InterpretedFunction.run = run
    return lambda: setattr(interpreter.InterpretedFunction, "run", original)


@contextlib.contextmanager
def dispatched_as_on_cuda(scale: float, half: bool) -> Iterator[None]:
    """Every op chosen as on an H100/H200 (132 SMs): the fused paths that the modules enable on
    CUDA (``*_DEVICES``: QKV, the resblocks' bias epilogues, the GEGLU GEMM, and with ``half``
    (fp16/bf16 activations) the one-kernel feed-forward, which leaves fp32 to the two GEMMs on
    CUDA but runs it under the interpreter), residual adds fused into norms (no CPU chunking),
    and GroupNorm's kernels and splits as the GPU plans them for a call whose samples and sizes
    are 1/``scale`` times this one's (the per-group kernels' split for 132 SMs; the rows
    kernels' choice between one launch, N >= SMs, and a split)."""
    import echofast.nn.attention as attention_nn
    import echofast.nn.resnet as resnet_nn
    import echofast.nn.spatiotemporal as st
    from echofast.kernels import group_norm as gn

    def as_on_cuda(devices: frozenset[str]) -> frozenset[str]:
        return devices | {"cpu"} if "cuda" in devices else devices

    patches = [
        (attention_nn, "FUSED_QKV_DEVICES", as_on_cuda(attention_nn.FUSED_QKV_DEVICES)),
        (resnet_nn, "FUSED_EPILOGUE_DEVICES", as_on_cuda(resnet_nn.FUSED_EPILOGUE_DEVICES)),
        (st, "FUSED_GEGLU_DEVICES", as_on_cuda(st.FUSED_GEGLU_DEVICES)),
        (st, "FUSED_FF_DEVICES", as_on_cuda(st.FUSED_FF_DEVICES) if half else frozenset()),
        (st, "TEMPORAL_GEMMS_DEVICES", as_on_cuda(st.TEMPORAL_GEMMS_DEVICES)),
        (st, "CPU_CHUNK_BYTES", 0),
        (gn, "target_programs", lambda x: H100_SMS * gn.PROGRAMS_PER_SM),
        (gn, "multiprocessors", lambda x: max(1, int(H100_SMS * scale))),
        (gn, "ROWS_SPLIT_MIN_BYTES", int(gn.ROWS_SPLIT_MIN_BYTES * scale)),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _count(call, autocast: torch.dtype | None, scale: float) -> collections.Counter:
    """Kernels of ``call()`` under ``autocast``, dispatched as on CUDA."""
    mode = KernelCount()
    with dispatched_as_on_cuda(scale, half=autocast is not None):
        restore = count_triton_launches(mode.counts)
        try:
            amp = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
            with torch.no_grad(), amp, mode:
                call()
        finally:
            restore()
    return mode.counts


def _models(lvdm_config: dict | None, impl: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from echofast import benchmark, benchmark_reference

    configs = benchmark._reference_configs()
    if lvdm_config is not None:
        configs["lvdm"] = lvdm_config
    return benchmark_reference.build_models(
        configs, torch.device("cpu"), with_diffusers=impl == "diffusers"
    )


def _pipeline_input(x: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    """The pipelines' UNet input: channels-last frames in the call's dtype (window_step writes
    it so)."""
    lead = x.shape[:-3]
    x = x.to(autocast or x.dtype).flatten(0, len(lead) - 1)
    return x.contiguous(memory_format=torch.channels_last).unflatten(0, lead)


def lvdm_call(
    config: dict, impl: str, frames: int = 64, autocast: torch.dtype | None = None
) -> collections.Counter:
    """Kernel counts of one LVDM call (one window of ``frames`` frames at 16×16; 64 as the
    pipeline's windows: GroupNorm's choice of kernels depends on the sizes) by echofast
    (``impl="echofast"``: the plain call; ``"echofast step"``: as its pipeline calls it at every
    step, with the conditioning half of ``conv_in`` and the run-constant features precomputed,
    the input in the model's layout and dtype, the output left in it) or diffusers; under
    ``autocast`` to that dtype as they sample in reduced precision: diffusers with fp32 weights
    (the reference's way), echofast through its ``autocast_copy`` (as its pipelines).
    GroupNorm is planned for the pipeline's batch-1 call (BATCH1_SCALE such windows)."""
    cfg = {**config, "num_frames": frames}
    models = _models(cfg, impl)
    model = models.d_lvdm if impl == "diffusers" else models.lvdm
    if autocast is not None and impl != "diffusers":
        model = model.autocast_copy(autocast)
    x = torch.randn(1, frames, cfg["in_channels"], 16, 16)
    ids = torch.randn(
        1, cfg["projection_class_embeddings_input_dim"] // cfg["addition_time_embed_dim"]
    )
    ehs = torch.randn(1, 1, cfg["cross_attention_dim"])
    t = torch.tensor(500.0)
    step: dict = {}
    if impl == "echofast step":
        c = cfg["in_channels"] // 2
        step["conditioning"] = models.lvdm.conditioning_features(x[:, 0, c:])
        amp = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
        with torch.no_grad(), amp:
            step.update(
                time_features=model.time_features(t, ids),
                context_features=model.context_features(ehs),
                frame_features=model.frame_features(frames),
            )
        x = _pipeline_input(x[:, :, :c], autocast)
        step["channels_last_output"] = True
    return _count(
        lambda: model(x, t, encoder_hidden_states=ehs, added_time_ids=ids, **step),
        autocast,
        frames / (64 * BATCH1_SCALE),
    )


def lidm_call(impl: str, autocast: torch.dtype | None = None) -> collections.Counter:
    """Kernel counts of one LIDM call at one image (the reference config, 14×14 latents padded
    to 16×16) by ``"lidm diffusers"`` or ``"lidm echofast step"`` (as its pipeline calls it:
    the time embedding precomputed, the input and output in the model's layout)."""
    models = _models(None, impl.split()[1])
    model = models.d_lidm if impl == "lidm diffusers" else models.lidm
    if autocast is not None and impl != "lidm diffusers":
        model = model.autocast_copy(autocast)
    x = torch.randn(1, model.config.in_channels, 16, 16)
    t = torch.tensor(500)
    step: dict = {}
    if impl == "lidm echofast step":
        amp = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
        with torch.no_grad(), amp:
            step["time_features"] = model.time_features(t)
        x = _pipeline_input(x, autocast)
        step["channels_last_output"] = True
    return _count(lambda: model(x, t, **step), autocast, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["full", "small"], default="full")
    p.add_argument("--top", type=int, default=12, help="ops listed per implementation")
    p.add_argument(
        "--autocast",
        choices=["none", "bfloat16", "float16"],
        default="bfloat16",
        help="also count under CPU autocast to this dtype (the op lists differ a little from "
        "CUDA's; bfloat16 runs fastest on CPU)",
    )
    p.add_argument(
        "--lidm",
        action="store_true",
        help="also count the LIDM (rows 'lidm diffusers', 'lidm echofast step')",
    )
    p.add_argument(
        "--temporal-gemms",
        action="store_true",
        help="count echofast's temporal convolutions of up to TEMPORAL_GEMMS_MAX_DIM channels "
        "as three GEMMs, as if TEMPORAL_GEMMS_DEVICES held cuda (rows 'echofast "
        "+temporal-gemms', ...)",
    )
    p.add_argument("--csv", type=Path, help="append one row per implementation and precision")
    a = p.parse_args(argv)
    suffix = ""
    if a.temporal_gemms:
        import echofast.nn.spatiotemporal as st

        st.TEMPORAL_GEMMS_DEVICES = st.TEMPORAL_GEMMS_DEVICES | {"cuda"}
        suffix = " +temporal-gemms"
    from echofast.ops._triton import triton_too_old

    if triton_too_old():  # the dispatcher would pick torch everywhere: no estimate of the GPU's
        p.error(f"{triton_too_old()}: the CUDA dispatch cannot be reproduced")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.configs import LVDM_FULL_CONFIG, LVDM_SMALL_CONFIG

    config = LVDM_FULL_CONFIG if a.config == "full" else LVDM_SMALL_CONFIG
    rows = []
    precisions = [None] if a.autocast == "none" else [None, getattr(torch, a.autocast)]
    impls = ("diffusers", "echofast", "echofast step")
    if a.lidm:
        impls += ("lidm diffusers", "lidm echofast step")
    for impl, amp in [(i, d) for d in precisions for i in impls]:
        if impl.startswith("lidm"):
            counts = lidm_call(impl, autocast=amp)
        else:
            counts = lvdm_call(config, impl, autocast=amp)
        total = sum(counts.values())
        how = "fp32" if amp is None else f"autocast {str(amp).split('.')[1]}"
        what = (
            "LIDM call (reference config, one image)"
            if impl.startswith("lidm")
            else (f"LVDM call ({a.config} config)")
        )
        if not impl.endswith("diffusers"):
            impl += suffix
        print(f"{impl}, {how}: ≈{total} kernels per {what}")
        for name, n in counts.most_common(a.top):
            print(f"  {n:5d} {name}")
        rows.append(
            {
                "git_sha": git_sha(),
                "torch": torch.__version__,
                "config": a.config,
                "impl": impl,
                "precision": how,
                "kernels": total,
                "triton_launches": sum(n for k, n in counts.items() if k.startswith("triton.")),
            }
        )
    if a.csv:
        append_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
