"""The pipelines' ``from_pretrained`` sample each UNet with the scheduler its model folder records
(``scheduler_config.json``, written by ``echofast train export``), the reference DDPM where none
is recorded; a scheduler passed explicitly wins; a record the fused step cannot run is refused
at load, naming the file. (The export itself: tests/train/test_export_scheduler.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from echofast.errors import ConfigError
from echofast.pipelines import EchoSyntheticPipeline, LIDMPipeline, LVDMPipeline
from echofast.pipelines.common import reference_scheduler
from echofast.schedulers import CONFIG_NAME, DDIMScheduler, DDPMScheduler


@pytest.fixture
def root(weights_root, tmp_path):
    """A private copy of the session's tiny weights root (the tests write into it)."""
    return shutil.copytree(weights_root, tmp_path / "weights")


def test_folders_without_a_record_sample_with_the_reference_ddpm(weights_root):
    reference = dict(reference_scheduler().config)
    lidm = LIDMPipeline.from_pretrained(weights_root / "lidm_dynamic")
    lvdm = LVDMPipeline.from_pretrained(weights_root / "lvdm", vae=weights_root / "vae")
    assert lidm.vae is None and lvdm.vae is not None
    pipe = EchoSyntheticPipeline.from_pretrained(weights_root)
    for p in (lidm, lvdm, pipe.lidm_pipe, pipe.lvdm_pipe):
        assert type(p.scheduler) is DDPMScheduler and dict(p.scheduler.config) == reference


def test_each_pipeline_samples_with_its_own_models_record(root):
    DDPMScheduler(prediction_type="epsilon", beta_schedule="scaled_linear").save_config(
        root / "lidm_dynamic"
    )
    recorded_ddim = DDIMScheduler(prediction_type="sample", timestep_spacing="trailing")
    recorded_ddim.save_config(root / "lvdm")
    pipe = EchoSyntheticPipeline.from_pretrained(root)
    lidm, lvdm = pipe.lidm_pipe.scheduler, pipe.lvdm_pipe.scheduler
    assert type(lidm) is DDPMScheduler and lidm.config.prediction_type == "epsilon"
    assert lidm.config.beta_schedule == "scaled_linear"
    assert type(lvdm) is DDIMScheduler and lvdm.config == recorded_ddim.config
    assert LVDMPipeline.from_pretrained(root / "lvdm").scheduler.config == recorded_ddim.config
    # a scheduler passed explicitly wins over both records
    given = DDIMScheduler()
    pipe = EchoSyntheticPipeline.from_pretrained(root, scheduler=given)
    assert pipe.lidm_pipe.scheduler is given and pipe.lvdm_pipe.scheduler is given


@pytest.mark.parametrize(
    "record, key",
    [
        ({"_class_name": "DDPMScheduler", "thresholding": True}, "'thresholding'"),
        ({"_class_name": "DDIMScheduler", "thresholding": True}, "'thresholding'"),
        ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "'variance_type'"),
        ({"_class_name": "EulerDiscreteScheduler"}, "'_class_name'"),
        ({"prediction_type": "epsilon"}, "'_class_name'"),
        ({"_class_name": "DDPMScheduler", "prediction_typ": "epsilon"}, "'prediction_typ'"),
        ({"_class_name": "DDPMScheduler", "beta_schedule": "cosine"}, "'beta_schedule'"),
        ("{not json", "cannot read"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
@pytest.mark.parametrize("model", ["lidm_dynamic", "lvdm"])
def test_records_the_fused_step_cannot_run_are_refused_at_load(root, record, key, model):
    path = root / model / CONFIG_NAME
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    pipeline = LIDMPipeline if model == "lidm_dynamic" else LVDMPipeline
    for load, folder in ((pipeline, root / model), (EchoSyntheticPipeline, root)):
        with pytest.raises(ConfigError, match=key) as err:
            load.from_pretrained(folder)
        assert str(path) in str(err.value)


def test_a_given_scheduler_is_used_without_reading_the_record(root):
    (root / "lidm_dynamic" / CONFIG_NAME).write_text('{"_class_name": "PNDMScheduler"}')
    given = DDPMScheduler()
    assert LIDMPipeline.from_pretrained(root / "lidm_dynamic", scheduler=given).scheduler is given
    assert EchoSyntheticPipeline.from_pretrained(root, scheduler=given).lidm_pipe.scheduler is given


def test_generate_checks_steps_against_the_records_and_keeps_them_in_the_identity(root, tmp_path):
    """``echofast generate`` refuses, before writing, a step count a recorded schedule lacks,
    and a folder started with one record is refused when the record has changed."""
    from echofast.pipelines.dataset import (
        GenerateConfig,
        GenerationArgumentError,
        GenerationConflict,
        generate_dataset,
    )

    DDPMScheduler(num_train_timesteps=10).save_config(root / "lvdm")
    cfg = dict(weights=str(root), num_videos=1, frames=4, steps=2, device="cpu", progress=False)
    out = tmp_path / "ds"
    with pytest.raises(GenerationArgumentError, match="--steps 64: lvdm"):
        generate_dataset(GenerateConfig(out=str(out), **{**cfg, "steps": 64}))
    assert not out.exists()
    assert generate_dataset(GenerateConfig(out=str(out), **cfg))["complete"]
    manifest = json.loads((out / "generation.json").read_text())
    assert "scheduler" in manifest["arguments"]["weights_sha256"]["lvdm"]
    assert "scheduler" not in manifest["arguments"]["weights_sha256"]["lidm"]
    DDPMScheduler(num_train_timesteps=20).save_config(root / "lvdm")
    with pytest.raises(GenerationConflict, match="weights"):
        generate_dataset(GenerateConfig(out=str(out), **cfg))
