"""diffusers' ModelMixin methods that training and saving scripts call on a model, checked against
the same methods of diffusers' models with the same weights: gradient checkpointing,
``num_parameters`` and ``save_pretrained``'s sharding, variants, formats and main-process flag."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel
from safetensors.torch import load_file
from support.models import build_diffusers

from echofast.models import LIDM, LVDM, VAE
from echofast.models.tiny import TINY_LIDM, TINY_LVDM, TINY_VAE

PAIRS = {
    "vae": (AutoencoderKL, VAE, TINY_VAE),
    "lidm": (UNet2DModel, LIDM, TINY_LIDM),
    "lvdm": (UNetSpatioTemporalConditionModel, LVDM, TINY_LVDM),
}
SHARD = re.compile(r"-\d{5}-of-\d{5}")


def _pair(kind: str, seed: int = 0):
    ref_cls, cls, config = PAIRS[kind]
    ref = build_diffusers(ref_cls, config, seed)
    ours = cls.from_config(config)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _loss(kind: str, model: torch.nn.Module) -> torch.Tensor:
    """A scalar of the model's output on fixed inputs (the VAE: encode, then decode the mean)."""
    g = torch.Generator().manual_seed(5)
    if kind == "vae":
        x = torch.randn(2, 3, 12, 12, generator=g)
        z = model.encode(x).latent_dist.mean
        out = model.decode(z).sample
    elif kind == "lidm":
        out = model(torch.randn(2, 4, 16, 16, generator=g), 321).sample
    else:
        x = torch.randn(1, 3, 8, 6, 6, generator=g)
        ctx, ids = torch.rand(1, 1, 1, generator=g), torch.randn(1, 1, generator=g)
        out = model(x, 321, ctx, ids).sample
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def _grads(kind: str, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Every parameter's gradient of :func:`_loss`, and the bytes autograd stored for it."""
    model.zero_grad(set_to_none=True)
    stored = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        stored[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(kind, model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stored[0]


# ---- gradient checkpointing ----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_gradient_checkpointing_matches_diffusers_and_stores_less(kind):
    ref, ours = _pair(kind)
    plain, plain_bytes = _grads(kind, ours)
    assert not ours.is_gradient_checkpointing
    ref.enable_gradient_checkpointing()
    ours.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing and ref.is_gradient_checkpointing
    theirs, _ = _grads(kind, ref)
    checkpointed, checkpointed_bytes = _grads(kind, ours)
    assert checkpointed.keys() == plain.keys()
    for name, grad in checkpointed.items():
        assert torch.allclose(grad, plain[name], rtol=1e-5, atol=1e-7), name
    # diffusers' gradients, to fp32 rounding of the largest one; parameters whose gradient is
    # zero analytically (a key bias; the query side of single-token cross-attention, which
    # echofast does not compute, so its parameters get none) may hold rounding noise there
    scale = max(g.abs().max().item() for g in theirs.values())
    assert checkpointed.keys() <= theirs.keys()
    for name, grad in theirs.items():
        mine = checkpointed.get(name, torch.zeros_like(grad))
        assert (mine - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-6 * scale, name
    # only the stages' inputs (and the layers outside the stages) are kept
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
    ours.disable_gradient_checkpointing()
    assert not ours.is_gradient_checkpointing
    assert _grads(kind, ours)[1] == plain_bytes


def test_checkpointing_function_is_called_for_each_stage_under_autograd_only():
    _, ours = _pair("lidm")
    calls = []

    def func(stage, *args):
        calls.append(type(stage).__name__)
        return torch.utils.checkpoint.checkpoint(stage, *args, use_reentrant=False)

    ours.enable_gradient_checkpointing(func)
    with torch.no_grad():
        _loss("lidm", ours)
    assert calls == []
    _grads("lidm", ours)
    stages = [*ours.down_blocks, *([ours.mid_block] if ours.mid_block else []), *ours.up_blocks]
    assert calls == [type(s).__name__ for s in stages]
    with pytest.raises(TypeError, match="gradient_checkpointing_func must be callable, got 3"):
        ours.enable_gradient_checkpointing(3)


def test_checkpointing_replays_dropout(tmp_path):
    """A stage with dropout is recomputed with the same mask (the RNG state is replayed)."""
    config = {**TINY_LIDM, "dropout": 0.5}
    torch.manual_seed(0)
    ours = LIDM.from_config(config).train()
    torch.manual_seed(7)
    plain, _ = _grads("lidm", ours)
    ours.enable_gradient_checkpointing()
    torch.manual_seed(7)
    checkpointed, _ = _grads("lidm", ours)
    for name, grad in checkpointed.items():
        assert torch.allclose(grad, plain[name], rtol=1e-5, atol=1e-7), name


# ---- num_parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_num_parameters_counts_as_diffusers(kind):
    ref, ours = _pair(kind)
    for model in (ref, ours):
        for name, p in model.named_parameters():
            if "conv_in" in name or "norm" in name:
                p.requires_grad_(False)
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            kw = {"only_trainable": only_trainable, "exclude_embeddings": exclude_embeddings}
            assert ours.num_parameters(**kw) == ref.num_parameters(**kw), kw
    assert ours.num_parameters(only_trainable=True) < ours.num_parameters()


def test_num_parameters_excludes_embedding_weights():
    _, ours = _pair("lidm")
    full = ours.num_parameters()
    ours.extra = torch.nn.Embedding(7, 3)
    assert ours.num_parameters() == full + 21
    assert ours.num_parameters(exclude_embeddings=True) == full


# ---- save_pretrained -----------------------------------------------------------------------


def _largest_tensor_bytes(model: torch.nn.Module) -> int:
    return max(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_save_is_named_as_diffusers_writes_it(tmp_path, variant):
    """The shard files, the index's name and contents are those diffusers writes (its
    tensors come in another order, so which tensor lands in which shard may differ); both
    libraries load the folder; every shard is within the limit."""
    ref, ours = _pair("vae")
    limit = _largest_tensor_bytes(ours) * 3
    ref.save_pretrained(tmp_path / "theirs", max_shard_size=limit, variant=variant)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=limit, variant=variant)
    names = {f.name for f in (tmp_path / "theirs").iterdir()}
    assert names == {f.name for f in (tmp_path / "ours").iterdir()}
    index = [n for n in names if n.endswith(".json") and n != "config.json"]
    assert len(index) == 1 and len([n for n in names if SHARD.search(n)]) > 2
    theirs, mine = (json.loads((tmp_path / d / index[0]).read_text()) for d in ("theirs", "ours"))
    assert mine["metadata"] == theirs["metadata"]
    assert list(mine["weight_map"]) == list(theirs["weight_map"])  # in the text's order too
    assert set(mine["weight_map"].values()) == names - {"config.json", index[0]}
    for name in names - {"config.json", index[0]}:
        shard = load_file(tmp_path / "ours" / name)
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= limit, name
        assert {k for k, v in mine["weight_map"].items() if v == name} == shard.keys()
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ours", variant=variant)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.state_dict().items())
    again = VAE.from_pretrained(tmp_path / "ours", variant=variant)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_tensor_over_the_limit_is_a_shard_of_its_own(tmp_path):
    _, ours = _pair("lidm")
    state = ours.state_dict()
    limit = _largest_tensor_bytes(ours) - 1
    ours.save_pretrained(tmp_path, max_shard_size=f"{limit}B")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards: dict[str, list[str]] = {}
    for key, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(key)
    for keys in shards.values():
        size = sum(state[k].numel() * state[k].element_size() for k in keys)
        assert size <= limit or len(keys) == 1, keys
    assert any(len(keys) == 1 and keys[0] for keys in shards.values())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_a_new_save_removes_the_weights_an_old_one_left(tmp_path):
    """Saving single-file weights over a sharded save (and back) leaves only the new files, so
    the old index cannot shadow them; other variants and files stay."""
    _, first = _pair("vae", seed=0)
    _, second = _pair("vae", seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    first.save_pretrained(tmp_path, variant="fp16")
    first.save_pretrained(tmp_path, max_shard_size=_largest_tensor_bytes(first) * 3)
    second.save_pretrained(tmp_path)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
        "notes.txt",
    ]
    for loaded in (VAE.from_pretrained(tmp_path), AutoencoderKL.from_pretrained(tmp_path)):
        assert all(torch.equal(v, second.state_dict()[k]) for k, v in loaded.state_dict().items())
    first.save_pretrained(tmp_path, max_shard_size=_largest_tensor_bytes(first) * 3)
    assert "diffusion_pytorch_model.safetensors" not in {f.name for f in tmp_path.iterdir()}
    loaded = VAE.from_pretrained(tmp_path)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in loaded.state_dict().items())
    # a variant's save leaves the plain weights alone
    second.save_pretrained(tmp_path, variant="fp16")
    loaded = VAE.from_pretrained(tmp_path)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_new_save_removes_pickled_weights_of_every_kind(tmp_path):
    """Pickles of every suffix and a pickled sharded save go; files only named alike stay."""
    _, ours = _pair("vae")
    ours.save_pretrained(tmp_path, safe_serialization=False, max_shard_size=4096)
    for suffix in (".bin", ".pt"):
        torch.save(ours.state_dict(), tmp_path / f"diffusion_pytorch_model{suffix}")
    keep = ["diffusion_pytorch_model-00001-of-00002.safetensors.orig", "notes.txt"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    assert len([f for f in tmp_path.iterdir() if SHARD.search(f.name)]) > 2
    ours.save_pretrained(tmp_path)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == sorted(["config.json", "diffusion_pytorch_model.safetensors", *keep])


def test_pickled_save_loads_with_allow_pickle_only(tmp_path):
    from echofast.errors import WeightsError

    ref, ours = _pair("lidm")
    ours.save_pretrained(tmp_path)
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.bin",
    ]
    with pytest.raises(WeightsError, match="allow_pickle=True"):
        LIDM.from_pretrained(tmp_path)
    for loaded in (
        LIDM.from_pretrained(tmp_path, allow_pickle=True),
        UNet2DModel.from_pretrained(tmp_path),
    ):
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_other_processes_write_nothing_and_bad_sizes_write_nothing(tmp_path):
    _, ours = _pair("vae")
    ours.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    for bad in ("ten GB", "10XB", "0GB", 0, -5, True, 1.5, "", "10GB!", "5 GB 3"):
        with pytest.raises(ValueError, match="max_shard_size must be"):
            ours.save_pretrained(tmp_path / "bad", max_shard_size=bad)
        with pytest.raises(ValueError, match="max_shard_size must be"):  # on every rank alike
            ours.save_pretrained(tmp_path / "bad", is_main_process=False, max_shard_size=bad)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("size", "bytes_"),
    [(123, 123), ("5GB", 5 * 10**9), ("500mb", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5KB", 1500)],
)
def test_shard_size_units(size, bytes_):
    from echofast.weights_io import shard_size_bytes

    assert shard_size_bytes(size) == bytes_


@pytest.mark.parametrize("size", ["1KB", "2.5MB", " 7 gb ", "3TB"])
def test_decimal_shard_sizes_are_read_as_huggingface_hub_reads_them(size):
    from huggingface_hub.serialization._base import parse_size_to_int

    from echofast.weights_io import shard_size_bytes

    assert shard_size_bytes(size) == parse_size_to_int(size)


@pytest.mark.parametrize(
    ("size", "bytes_"), [("3KiB", 3 * 2**10), ("1MiB", 2**20), ("1TiB", 2**40)]
)
def test_binary_shard_sizes(size, bytes_):
    from echofast.weights_io import shard_size_bytes

    assert shard_size_bytes(size) == bytes_


@pytest.mark.parametrize("limit", [8, 12, 16, 40])
def test_shards_group_tensors_as_huggingface_hub_does(limit):
    """Tensors no larger than the limit are grouped as huggingface_hub groups them (a shard that
    the next tensor would take over the limit is closed; one that it fills exactly is not)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from echofast.weights_io import plan_shards

    state = {
        name: torch.zeros(n, dtype=torch.float16)
        for name, n in zip("abcdefg", (4, 2, 2, 3, 1, 4, 2), strict=True)
    }
    theirs = split_torch_state_dict_into_shards(state, max_shard_size=limit)
    assert plan_shards(state, limit) == list(theirs.filename_to_tensors.values())


def test_a_first_tensor_over_the_limit_is_a_shard_of_its_own():
    from echofast.weights_io import plan_shards

    state = {"big": torch.zeros(9), "a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(9)}
    assert plan_shards(state, 8) == [["big"], ["a", "b"], ["c"]]


def test_two_shards_are_a_sharded_save(tmp_path):
    """Weights just over the limit are two shards and their index, as diffusers writes them."""
    ref, ours = _pair("lidm")
    limit = sum(t.numel() * t.element_size() for t in ours.state_dict().values()) - 1
    ref.save_pretrained(tmp_path / "theirs", max_shard_size=limit)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=limit)
    names = sorted(f.name for f in (tmp_path / "ours").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "theirs").iterdir())
    assert len([n for n in names if SHARD.search(n)]) == 2
    for loaded in (
        UNet2DModel.from_pretrained(tmp_path / "ours"),
        LIDM.from_pretrained(tmp_path / "ours"),
    ):
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.state_dict().items())
