"""``EchoSyntheticPipeline``: the weights root's folder layout (the reference's names) and the
chain LIDM → LVDM, which must hand every option of a call to the sub-pipeline it concerns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from echofast.errors import MissingFileError
from echofast.models import LIDM, LVDM, VAE
from echofast.pipelines import EchoSyntheticPipeline

REFERENCE_FOLDERS = ("vae", "lidm_dynamic", "lidm_ped_a4c", "lidm_ped_psax", "lvdm")


@pytest.mark.parametrize("dataset", ["dynamic", "ped_a4c", "ped_psax"])
def test_each_dataset_reads_its_reference_folder(tmp_path, dataset):
    for name in REFERENCE_FOLDERS:
        (tmp_path / name).mkdir()
    folders = EchoSyntheticPipeline.folders(str(tmp_path), dataset)
    assert folders == {
        "vae": tmp_path / "vae",
        "lidm": tmp_path / f"lidm_{dataset}",
        "lvdm": tmp_path / "lvdm",
    }


def test_unknown_datasets_and_missing_folders_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"dataset must be one of \['dynamic', 'ped_a4c', "):
        EchoSyntheticPipeline.folders(tmp_path, "camus")
    (tmp_path / "vae").mkdir()
    (tmp_path / "lidm_dynamic").mkdir()
    (tmp_path / "lvdm").write_text("not a folder")
    with pytest.raises(MissingFileError) as err:
        EchoSyntheticPipeline.folders(tmp_path, "dynamic")
    assert str(tmp_path / "lvdm") in str(err.value)
    assert "vae'" not in str(err.value) and "lidm_dynamic" not in str(err.value)
    with pytest.raises(MissingFileError, match="lidm_ped_psax"):
        EchoSyntheticPipeline.from_pretrained(tmp_path, dataset="ped_psax")


def test_from_pretrained_loads_every_model_on_the_device(weights_root, monkeypatch):
    loaded = []
    for cls in (LIDM, LVDM, VAE):
        real = cls.from_pretrained

        def spy(path, device=None, allow_pickle=False, _real=real):
            loaded.append((path.name, device, allow_pickle))
            return _real(path, device=device, allow_pickle=allow_pickle)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    pipe = EchoSyntheticPipeline.from_pretrained(weights_root, device="cpu")
    names = ["lidm_dynamic", "lvdm", "vae"]
    assert sorted(loaded) == [(name, "cpu", False) for name in names]
    assert pipe.vae is pipe.lvdm_pipe.vae is pipe.lidm_pipe.vae
    loaded.clear()
    EchoSyntheticPipeline.from_pretrained(weights_root, device="cpu", allow_pickle=True)
    assert sorted(loaded) == [(name, "cpu", True) for name in names]


class _Recorder:
    """Stands in for a sub-pipeline: records each call's arguments, returns ``result``; other
    attributes (``lidm``: the model whose device the precision is checked against) as given."""

    def __init__(self, result, **attributes):
        self.result, self.calls = result, []
        self.__dict__.update(attributes)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def test_every_option_reaches_the_sub_pipeline_it_concerns(weights_root, monkeypatch):
    pipe = EchoSyntheticPipeline.from_pretrained(weights_root)
    images, videos = torch.randn(3, 4, 6, 6), torch.zeros(3, 7, 12, 12, dtype=torch.uint8)
    lidm = _Recorder(SimpleNamespace(latents=images), lidm=pipe.lidm)
    lvdm = _Recorder(SimpleNamespace(videos=videos))
    monkeypatch.setattr(pipe, "lidm_pipe", lidm)
    monkeypatch.setattr(pipe, "lvdm_pipe", lvdm)
    out = pipe(
        [20.0, 45.5, 90.0],
        seed=11,
        sample_indices=[9, 4, 2],
        num_frames=7,
        num_inference_steps=3,
        batch_size=2,
        decode_chunk_size=5,
        dtype="float32",
        decode_dtype=torch.bfloat16,
        cuda_graphs=False,
        progress=True,
    )
    shared = dict(
        seed=11,
        sample_indices=[9, 4, 2],
        num_inference_steps=3,
        batch_size=2,
        dtype="float32",
        cuda_graphs=False,
        progress=True,
    )
    assert lidm.calls == [((3,), shared)]
    [(args, kwargs)] = lvdm.calls
    assert args[0] is images and torch.equal(args[1], torch.tensor([20.0, 45.5, 90.0]))
    assert kwargs == dict(shared, num_frames=7, decode_chunk_size=5, decode_dtype=torch.bfloat16)
    assert out.videos is videos and out.image_latents is images
    pipe([30.0], seed=0)  # default sample indices: 0..n-1
    assert lidm.calls[-1][1]["sample_indices"] == lvdm.calls[-1][1]["sample_indices"] == [0]
