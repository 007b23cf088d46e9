"""echofast.weights.build.export_fp16: the demo weights' release step."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from echofast.schedulers import CONFIG_NAME, DDPMScheduler
from echofast.weights.build import WEIGHTS_FILE, export_fp16


def test_export_fp16_halves_the_weights_and_keeps_the_recorded_schedule(tmp_path):
    src, dst = tmp_path / "run" / "export", tmp_path / "demo" / "lidm_dynamic"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    state = {"w": torch.randn(3, 5), "steps": torch.arange(4)}
    save_file(state, str(src / WEIGHTS_FILE))
    DDPMScheduler(prediction_type="epsilon").save_config(src)
    size = export_fp16(src, dst)
    out = load_file(str(dst / WEIGHTS_FILE))
    assert size == (dst / WEIGHTS_FILE).stat().st_size
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], state["w"].half())
    assert torch.equal(out["steps"], state["steps"])
    assert (dst / CONFIG_NAME).read_bytes() == (src / CONFIG_NAME).read_bytes()
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
