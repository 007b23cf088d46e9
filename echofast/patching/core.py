"""``patch`` / ``unpatch``: find what can run on echofast in a diffusers object, and switch it.

Mechanism. A patched module keeps its identity, parameters, state-dict keys and config; only its
class is switched to a subclass *of the same name* whose ``forward`` runs echofast (so
``isinstance`` checks, ``save_pretrained`` and pipelines that read ``config``/``dtype``/``device``
keep working), and its ``__dict__`` holds a :class:`SiteState`. Diffusers ``Attention`` modules
get an :class:`~echofast.patching.sites.AttentionProcessor` through ``set_processor``. ``unpatch``
switches the classes and processors back; a patched ``forward`` that is still called after that
(e.g. through a bound method someone kept) runs the original code. ``pickle``/``torch.save``
store the unpatched diffusers objects, copies stay patched (:mod:`echofast.patching.pickling`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailable, EchofastError
from . import models, sites
from .pickling import copy_as_is, unpickled_as
from .report import LeftAlone, PatchedSite, PatchReport, Replacement

STATE = "_echofast_state"
RECORD = "_echofast_patch"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PatchError(EchofastError, ValueError):
    """``echofast.patch``/``unpatch`` got an object or option it cannot handle."""


@dataclass(eq=False)
class SiteState:
    """Per patched module: its kind and the options its patched forward runs with."""

    kind: str
    backends: dict[str, str]
    dtype: torch.dtype | None = None
    echo: nn.Module | None = None

    @property
    def gn_backend(self) -> str | None:
        return self.backends.get("group_norm")

    @property
    def attn_backend(self) -> str | None:
        return self.backends.get("attention")

    def backend_context(self) -> contextlib.AbstractContextManager:
        """Forces :attr:`backends` inside echofast models (their ops take no ``backend=``)."""
        if not self.backends:
            return contextlib.nullcontext()
        from ..ops import use_backend

        return use_backend(**self.backends)


@dataclass(eq=False)
class PatchRecord:
    """Everything one ``patch`` call changed, so that ``unpatch`` can undo exactly that."""

    options: tuple
    report: PatchReport
    structure: tuple = ()
    """The patched trees as the patch left them (:func:`_structure`)."""
    modules: list[tuple[nn.Module, type, type]] = field(default_factory=list)
    processors: list[tuple[nn.Module, Any, sites.AttentionProcessor]] = field(default_factory=list)
    ids: set[int] = field(default_factory=set)

    def owns(self, module: nn.Module) -> bool:
        return id(module) in self.ids

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickles as None: a pickled patched object is unpatched."""
        return unpickled_as(None)

    def __copy__(self) -> PatchRecord:
        return copy_as_is(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchRecord:
        clone = copy_as_is(self, memo)
        clone.ids = {id(module) for module, _, _ in clone.modules}
        # the copied tree's modules and processors: patching the copy again changes nothing
        clone.structure = tuple(
            (*entry[:2], _copied_id(entry[2], memo), *entry[3:-1], _copied_id(entry[-1], memo))
            for entry in clone.structure
        )
        return clone


def _copied_id(object_id: int, memo: dict[int, Any]) -> int:
    """The id of the deep copy of the object whose id is ``object_id`` (itself if not copied)."""
    return id(memo[object_id]) if object_id in memo else object_id


# ---- switched classes -------------------------------------------------------------------------

_IMPLS: dict[str, Callable[..., Any]] = {
    "resnet": sites.resnet2d_forward,
    "temporal_resnet": sites.temporal_resnet_forward,
    "group_norm": sites.group_norm_forward,
    "autocast": sites.entry_forward,
    **models.FORWARDS,
}
_CLASSES: dict[tuple[type, str], type] = {}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _cast_floats(out: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``out`` (a tensor, tuple/list, or diffusers output) cast to dtype."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out
    if isinstance(out, tuple) and not hasattr(out, "keys"):
        return type(out)(_cast_floats(v, dtype) for v in out)
    if isinstance(out, list):
        return [_cast_floats(v, dtype) for v in out]
    if isinstance(out, Mapping):  # diffusers' BaseOutput: item assignment sets the attribute
        for key in list(out.keys()):
            value = _cast_floats(out[key], dtype)
            if value is not out[key]:
                out[key] = value
        return out
    return out


def _reduce_unpatched(self: nn.Module, protocol: int) -> tuple:
    """A switched module pickles as an instance of its original class, without its SiteState."""
    base = type(self)._echofast_base
    state = {k: v for k, v in self.__getstate__().items() if k != STATE}
    return base.__new__, (base,), state


def _switched_class(base: type, kind: str) -> type:
    """``base``'s subclass (same name and module) whose forward runs ``_IMPLS[kind]``; it pickles
    as ``base`` (see :mod:`echofast.patching.pickling`)."""
    key = (base, kind)
    if key in _CLASSES:
        return _CLASSES[key]
    impl = _IMPLS[kind]

    @functools.wraps(base.forward)
    def forward(self, *args, **kwargs):
        st = self.__dict__.get(STATE)
        if st is None:  # unpatched, but called through a method bound while patched
            return base.forward(self, *args, **kwargs)
        if st.dtype is None:
            return impl(self, st, base, *args, **kwargs)
        ref = _first_tensor(args, kwargs)
        if ref is None:
            return impl(self, st, base, *args, **kwargs)
        with torch.autocast(ref.device.type, dtype=st.dtype):
            out = impl(self, st, base, *args, **kwargs)
        return _cast_floats(out, ref.dtype) if ref.is_floating_point() else out

    forward.__signature__ = inspect.signature(base.forward)
    cls = type(
        base.__name__,
        (base,),
        {
            "forward": forward,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_echofast_kind": kind,
            "_echofast_base": base,
            "__reduce_ex__": _reduce_unpatched,
            "__copy__": copy_as_is,
            "__deepcopy__": copy_as_is,
        },
    )
    _CLASSES[key] = cls
    return cls


def _switch(module: nn.Module, kind: str, st: SiteState, record: PatchRecord) -> None:
    base = type(module)
    cls = _switched_class(base, kind)
    module.__dict__[STATE] = st
    module.__class__ = cls
    record.modules.append((module, base, cls))
    record.ids.add(id(module))


# ---- options ----------------------------------------------------------------------------------


def _resolve_backends(backend: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"torch"`` (every op with a backend of that name) or ``"group_norm=torch,attention=sdpa"``
    or a dict → {op: backend}; unknown ops or backends raise."""
    from ..ops import registered_ops

    if backend is None:
        return {}
    known = registered_ops()
    if isinstance(backend, str):
        spec: dict[str, str] = {}
        for part in (p.strip() for p in backend.split(",")):
            if not part:
                continue
            op, sep, name = part.partition("=")
            spec.update({op.strip(): name.strip()} if sep else {"*": part})
    elif isinstance(backend, Mapping):
        spec = {str(k): str(v) for k, v in backend.items()}
    else:
        raise PatchError(f"backend must be a string or a dict, got {type(backend).__name__}")
    out: dict[str, str] = {}
    for op, name in spec.items():
        if op == "*":
            continue
        if op not in known:
            raise PatchError(f"backend: unknown op {op!r}; ops: {sorted(known)}")
        if name not in known[op].backends:
            raise BackendUnavailable(
                op, name, [f"no such backend; known: {list(known[op].backends)}"]
            )
        out[op] = name
    if "*" in spec:
        name = spec["*"]
        matched = [op for op, o in known.items() if name in o.backends]
        if not matched:
            raise BackendUnavailable(
                "*", name, [f"{op}: known {list(o.backends)}" for op, o in known.items()]
            )
        for op in matched:
            out.setdefault(op, name)
    return out


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise PatchError(f"dtype {dtype!r} not supported (one of {sorted(_DTYPES)})")
        return _DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    raise PatchError(f"dtype {dtype!r} not supported (float16, bfloat16 or float32)")


# ---- what to patch ----------------------------------------------------------------------------


@functools.cache
def _diffusers() -> dict[str, type | None]:
    """The diffusers classes the patcher knows, imported on first use (None if absent)."""
    import importlib

    names = {
        "ModelMixin": "diffusers.models.modeling_utils",
        "DiffusionPipeline": "diffusers.pipelines.pipeline_utils",
        "Attention": "diffusers.models.attention_processor",
        "AttnProcessor": "diffusers.models.attention_processor",
        "AttnProcessor2_0": "diffusers.models.attention_processor",
        "ResnetBlock2D": "diffusers.models.resnet",
        "TemporalResnetBlock": "diffusers.models.resnet",
        "AlphaBlender": "diffusers.models.resnet",
        "Encoder": "diffusers.models.autoencoders.vae",
        "Decoder": "diffusers.models.autoencoders.vae",
    }
    out: dict[str, type | None] = {}
    for name, module in names.items():
        try:
            out[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            out[name] = None
    return out


def _instance_forward(module: nn.Module) -> str | None:
    """Why switching ``module``'s class would not change what its calls run, or None."""
    if "forward" in module.__dict__:
        return "its forward is wrapped at instance level (e.g. accelerate offload hooks)"
    return None


def _bypassed(module: nn.Module | None) -> str | None:
    """Why ``module`` must not be bypassed (its __call__ skipped by a fused call), or None."""
    if module is None:
        return None
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks"
    return _instance_forward(module)


def _owned_hooks(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        why = _bypassed(getattr(module, name, None))
        if why:
            return f"{name} {why}: a fused call would bypass it"
    return None


def _resnet_reason(m: nn.Module) -> str | None:
    if not (type(m.norm1) is nn.GroupNorm and type(m.norm2) is nn.GroupNorm):
        return "norm1/norm2 are not plain GroupNorm"
    if type(m.nonlinearity) is not nn.SiLU:
        return f"activation is {type(m.nonlinearity).__name__}, not SiLU"
    kind = getattr(m, "time_embedding_norm", "default")
    if kind == "scale_shift" and m.time_emb_proj is None:
        return "scale_shift without time_emb_proj"
    return _owned_hooks(m, ("norm1", "norm2", "nonlinearity"))


def _attention_reason(m: nn.Module, d: dict) -> str | None:
    proc = m.processor
    defaults = tuple(c for c in (d["AttnProcessor2_0"], d["AttnProcessor"]) if c is not None)
    if type(proc) not in defaults:
        return f"custom processor {type(proc).__name__} (kept)"
    if m.added_kv_proj_dim is not None:
        return "added key/value projections"
    if m.to_k is None or m.to_v is None or m.to_out is None:
        return "no to_k/to_v/to_out projections"
    if m.inner_kv_dim != m.inner_dim:
        return "grouped key/value heads"
    return _owned_hooks(m, ("group_norm", "to_q", "to_k", "norm_q", "norm_k"))


def _replace_reason(m: nn.Module, d: dict) -> str | None:
    """Why ``m`` (a diffusers model) must not be served by an echofast model, or None."""
    why = _instance_forward(m)
    if why:
        return why
    defaults = tuple(c for c in (d["AttnProcessor2_0"], d["AttnProcessor"]) if c is not None)
    for path, sub in m.named_modules():
        if sub is m:
            continue
        why = _bypassed(sub)
        if why:
            return f"{path} {why}"
        if d["Attention"] is not None and isinstance(sub, d["Attention"]):
            if type(sub.processor) not in (*defaults, sites.AttentionProcessor):
                return f"{path} has custom attention processor {type(sub.processor).__name__}"
        if d["AlphaBlender"] is not None and isinstance(sub, d["AlphaBlender"]):
            if sub.merge_strategy != "learned_with_images" or sub.switch_spatial_to_temporal_mix:
                return f"{path}: AlphaBlender {sub.merge_strategy!r} is not supported"
    return None


def _entries(root: nn.Module, d: dict) -> list[tuple[str, nn.Module]]:
    """Modules whose forward is a model's public call: UNets, a VAE's encoder and decoder (the
    outermost diffusers models in ``root``), else ``root`` itself."""
    found: list[tuple[str, nn.Module]] = []
    model_mixin = d["ModelMixin"]
    skip: list[str] = []
    for path, m in root.named_modules():
        if _under(path, skip):
            continue
        if model_mixin is not None and isinstance(m, model_mixin):
            skip.append(path)
            enc, dec = getattr(m, "encoder", None), getattr(m, "decoder", None)
            if hasattr(m, "decode") and isinstance(enc, nn.Module) and isinstance(dec, nn.Module):
                found += [(_join(path, "encoder"), enc), (_join(path, "decoder"), dec)]
            else:
                found.append((path, m))
    return found or [("", root)]


def _under(path: str, prefixes: list[str]) -> bool:
    """``path`` is one of ``prefixes`` or inside one ("" is the root: everything is inside)."""
    return any(p == "" or path == p or path.startswith(p + ".") for p in prefixes)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _foreign(m: nn.Module, record: PatchRecord) -> bool:
    """Patched by another ``patch`` call (or the root of one)."""
    return (STATE in m.__dict__ and not record.owns(m)) or _record_of(m) is not None


def _unpatched_modules(
    prefix: str, root: nn.Module, record: PatchRecord
) -> list[tuple[str, nn.Module]]:
    """``root.named_modules()`` without the subtrees another ``patch`` call patched (those are
    reported as left alone)."""
    out: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for path, m in root.named_modules():
        if _under(path, skipped):
            continue
        if _foreign(m, record):
            skipped.append(path)
            record.report.left_alone.append(
                LeftAlone(
                    _join(prefix, path),
                    type(m).__name__,
                    "already patched by another echofast.patch call",
                )
            )
            continue
        out.append((path, m))
    return out


def _patch_sites(
    prefix: str,
    modules: list[tuple[str, nn.Module]],
    record: PatchRecord,
    backends: dict[str, str],
    d: dict,
) -> None:
    """Fused resnets, echofast attention processors, then the remaining GroupNorms."""
    report = record.report
    owned: set[int] = set()  # GroupNorms called by patched resnets / processors
    resnets = {d["ResnetBlock2D"]: "resnet", d["TemporalResnetBlock"]: "temporal_resnet"}
    resnets.pop(None, None)
    for path, m in modules:
        full = _join(prefix, path)
        t = type(m)
        if t in resnets:
            why = _resnet_reason(m) or _instance_forward(m)
            if why:
                report.left_alone.append(LeftAlone(full, t.__name__, why))
                continue
            _switch(m, resnets[t], SiteState(resnets[t], backends), record)
            owned.update((id(m.norm1), id(m.norm2)))
            report.patched.append(PatchedSite(full, resnets[t], "norm1+SiLU, norm2+SiLU fused"))
        elif d["Attention"] is not None and t is d["Attention"]:
            why = _attention_reason(m, d)
            if why:
                report.left_alone.append(LeftAlone(full, "Attention", why))
                continue
            proc = sites.AttentionProcessor(
                m.processor,
                gn_backend=backends.get("group_norm"),
                attn_backend=backends.get("attention"),
                classic=type(m.processor) is d["AttnProcessor"],
            )
            record.processors.append((m, m.processor, proc))
            m.set_processor(proc)
            if m.group_norm is not None:
                owned.add(id(m.group_norm))
            report.patched.append(PatchedSite(full, "attention", "echofast attention processor"))
    for path, m in modules:
        if type(m) is not nn.GroupNorm or id(m) in owned:
            continue
        full = _join(prefix, path)
        why = _instance_forward(m)
        if why:
            report.left_alone.append(LeftAlone(full, "GroupNorm", why))
            continue
        _switch(m, "group_norm", SiteState("group_norm", backends), record)
        report.patched.append(PatchedSite(full, "group_norm", "ops.group_norm"))


def _replace_models(
    prefix: str,
    modules: list[tuple[str, nn.Module]],
    record: PatchRecord,
    backends: dict[str, str],
    d: dict,
) -> None:
    """Serve each supported diffusers model by an echofast model sharing its parameters."""
    report = record.report
    for path, m in modules:
        found = models.echofast_class(m)
        full = _join(prefix, path)
        if found is None:
            if d["ModelMixin"] is not None and isinstance(m, d["ModelMixin"]):
                report.left_alone.append(
                    LeftAlone(
                        full,
                        type(m).__name__,
                        "not replaced: echofast has no model of this class; call sites patched",
                    )
                )
            continue
        why = _replace_reason(m, d)
        echo = None
        if not why:
            echo, why = models.build_echofast(m)
        if echo is not None:
            why = _replace(m, echo, d)
        if why:
            report.left_alone.append(
                LeftAlone(full, type(m).__name__, f"not replaced: {why}; call sites patched")
            )
            continue
        kind = found[1]
        halves = (
            [("encoder", "vae_encoder"), ("decoder", "vae_decoder")]
            if kind == "vae"
            else [("", kind)]
        )
        for name, part_kind in halves:
            target = m.get_submodule(name) if name else m
            part = echo.get_submodule(name) if name else echo
            _switch(target, part_kind, SiteState(part_kind, backends, echo=part), record)
        report.replaced.append(
            Replacement(full, type(m).__name__, f"echofast.models.{type(echo).__name__}")
        )


def _patch_tree(
    prefix: str,
    root: nn.Module,
    record: PatchRecord,
    backends: dict[str, str],
    dtype: torch.dtype | None,
    replace_models: bool,
) -> None:
    d = _diffusers()
    modules = _unpatched_modules(prefix, root, record)
    _patch_sites(prefix, modules, record, backends, d)
    if replace_models:
        _replace_models(prefix, modules, record, backends, d)
    if dtype is None:
        return
    for path, m in _entries(root, d):
        if record.owns(m):
            m.__dict__[STATE].dtype = dtype
        elif not _foreign(m, record):
            _switch(m, "autocast", SiteState("autocast", backends, dtype=dtype), record)
            record.report.patched.append(
                PatchedSite(_join(prefix, path), "autocast", f"autocast {dtype}")
            )


def _replace(m: nn.Module, echo: nn.Module, d: dict) -> str | None:
    """Share ``m``'s parameters into ``echo`` (for a VAE: its encoder and decoder halves)."""
    if models.echofast_class(m)[1] == "vae":
        if type(m.encoder) is not d["Encoder"] or type(m.decoder) is not d["Decoder"]:
            return "encoder/decoder are not diffusers' Encoder/Decoder"
        for name in ("encoder", "decoder"):
            why = models.share_parameters(echo.get_submodule(name), m.get_submodule(name))
            if why:
                return why
        return None
    return models.share_parameters(echo, m)


def _targets(obj: Any) -> tuple[list[tuple[str, nn.Module]], list[LeftAlone]]:
    """The modules to patch in ``obj``: the module itself, or a pipeline's diffusers models."""
    if isinstance(obj, nn.Module):
        return [("", obj)], []
    d = _diffusers()
    pipeline = d["DiffusionPipeline"]
    if pipeline is None or not isinstance(obj, pipeline):
        raise PatchError(
            f"echofast.patch takes a diffusers pipeline or a torch.nn.Module, "
            f"got {type(obj).__name__}"
        )
    targets, skipped = [], []
    for name, component in obj.components.items():
        if not isinstance(component, nn.Module):
            continue
        if d["ModelMixin"] is not None and isinstance(component, d["ModelMixin"]):
            targets.append((name, component))
        else:
            skipped.append(
                LeftAlone(name, type(component).__name__, "not a diffusers model (left as is)")
            )
    return targets, skipped


# ---- public API -------------------------------------------------------------------------------


def _record_of(obj: Any) -> PatchRecord | None:
    return getattr(obj, "__dict__", {}).get(RECORD)


def _structure(targets: list[tuple[str, nn.Module]]) -> tuple:
    """Every module of the patched trees with its hook counts, whether its forward is wrapped at
    instance level, and its attention processor: a submodule replaced or added (LoRA layers, a
    wrapper), a hook (diffusers' HookRegistry wraps the forward) or a processor set after
    patching changes it. (Parameters are shared with the echofast models, so new values or
    parameter objects need no new patch.)"""
    return tuple(
        (
            prefix,
            path,
            id(m),
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            "forward" in m.__dict__,
            id(getattr(m, "processor", None)),
        )  # fmt: skip
        for prefix, root in targets
        for path, m in root.named_modules()
    )


def patch(
    obj: Any,
    *,
    backend: str | Mapping[str, str] | None = None,
    dtype: torch.dtype | str | None = None,
    replace_models: bool = True,
) -> PatchReport:
    """Accelerate a diffusers pipeline or model in place with echofast's models and fused ops.

    * A ``UNetSpatioTemporalConditionModel``, ``UNet2DModel`` or ``AutoencoderKL`` (encoder and
      decoder) whose config echofast's ``LVDM``/``LIDM``/``VAE`` supports has its forward run by
      that echofast model, built around the diffusers module's own parameters (shared, not
      copied). Inputs, outputs (diffusers' output classes, ``return_dict=False`` tuples), config,
      state dict and ``save_pretrained`` stay diffusers'. Under gradient checkpointing the
      echofast model checkpoints its blocks with the diffusers model's checkpointing function.
      Calls echofast does not cover (class labels, a VAE's spatial-norm decoder input) run
      diffusers' code, on the patched call sites below.
    * Everywhere else (any config, any diffusers module tree, also inside replaced models):
      ``ResnetBlock2D`` and ``TemporalResnetBlock`` run both GroupNorm+SiLU pairs as one fused
      op; ``Attention`` modules with diffusers' default processor get echofast's processor
      (``ops.attention``, and the exact single-key path for one-token cross-attention); the
      remaining ``GroupNorm`` modules run ``ops.group_norm``.
    * Modules with forward hooks, custom attention processors or other non-default behaviour
      are left alone; the report says which and why.

    Patches are runtime state: ``pickle`` and ``torch.save`` of a patched pipeline or module (or
    of anything holding one) store the plain diffusers object, unpatched (original classes and
    attention processors, the same parameters and config, no echofast state), which loads
    without echofast; patch it again after loading. ``copy.copy``/``copy.deepcopy`` give patched
    copies (a deep copy's echofast models use the copied parameters; unpatch it on its own).

    Args:
        obj: a diffusers ``DiffusionPipeline`` (its diffusers models are patched) or any
            ``torch.nn.Module`` (typically a diffusers model or one of its submodules).
        backend: force op backends: ``"torch"`` (every op that has a backend of that name),
            ``"group_norm=torch,attention=sdpa"``, or a dict; default: automatic choice.
        dtype: run the patched models' forwards under ``torch.autocast`` with this dtype
            (weights stay as they are; outputs are cast back to the input's dtype).
        replace_models: False patches call sites only (no whole-model replacement).

    Changes made to the module tree after patching (a replaced or added submodule, e.g. LoRA
    layers; a forward hook, also one of diffusers' ``HookRegistry``; an attention processor) are
    not seen by the echofast models that serve replaced forwards: call ``patch`` again, which
    then patches anew (with the changed modules left alone where echofast does not cover them).

    Returns:
        A :class:`PatchReport`. Patching an object again with the same options and an unchanged
        module tree returns its report and changes nothing; otherwise the object is unpatched
        and patched anew.

    Raises:
        PatchError: ``obj`` is neither a pipeline nor a module, or an option is invalid.
        BackendUnavailable: ``backend`` names a backend that does not exist.
    """
    backends = _resolve_backends(backend)
    dt = _resolve_dtype(dtype)
    options = (tuple(sorted(backends.items())), dt, bool(replace_models))
    existing = _record_of(obj)
    if existing is not None:
        if existing.options == options and existing.structure == _structure(_targets(obj)[0]):
            return existing.report
        unpatch(obj)
    targets, skipped = _targets(obj)
    report = PatchReport(type(obj).__name__, dict(backends), dt, left_alone=skipped)
    record = PatchRecord(options, report)
    try:
        for prefix, module in targets:
            _patch_tree(prefix, module, record, backends, dt, bool(replace_models))
    except BaseException:
        _undo(record)
        raise
    record.structure = _structure(targets)
    obj.__dict__[RECORD] = record
    return report


def _undo(record: PatchRecord) -> None:
    for module, base, cls in reversed(record.modules):
        if type(module) is cls:
            module.__class__ = base
        module.__dict__.pop(STATE, None)
    for attn, original, ours in reversed(record.processors):
        if attn.processor is ours:
            attn.set_processor(original)
    record.modules.clear()
    record.processors.clear()
    record.ids.clear()


def _patched_inside(obj: Any) -> Iterator[str]:
    """Paths of the switched modules in ``obj`` (``<root>`` for an ``obj`` switched itself)."""
    targets = [("", obj)] if isinstance(obj, nn.Module) else []
    if not targets and hasattr(obj, "components"):
        targets = [(k, v) for k, v in obj.components.items() if isinstance(v, nn.Module)]
    for prefix, module in targets:
        for path, m in module.named_modules():
            if STATE in m.__dict__:
                yield _join(prefix, path) or "<root>"


def unpatch(obj: Any) -> bool:
    """Undo :func:`patch` on ``obj``: original classes, forwards and attention processors.

    Returns True when something was restored, False when ``obj`` was not patched. Processors
    replaced by the user after patching are kept.

    Raises:
        PatchError: ``obj`` was not patched itself, but modules inside it were patched through
            another object (unpatch that one).
    """
    record = _record_of(obj)
    if record is None:
        inside = list(_patched_inside(obj))
        if inside:
            more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
            raise PatchError(
                f"{type(obj).__name__} was not passed to echofast.patch itself, but holds modules "
                f"patched through another object ({inside[0]}{more}): unpatch that one"
            )
        return False
    _undo(record)
    del obj.__dict__[RECORD]
    return True
