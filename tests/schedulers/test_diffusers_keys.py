"""A config naming our own class may hold other diffusers scheduler classes' keys (diffusers keeps
them when it converts a config): they are dropped with a warning, as diffusers drops them, while
a key no diffusers scheduler has is refused. The fixed table of diffusers' keys is checked
against the installed diffusers."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import diffusers
import pytest
import torch

from echofast.errors import ConfigError
from echofast.schedulers import CONFIG_NAME, DDIMScheduler, DDPMScheduler
from echofast.schedulers.diffusers_keys import (
    DIFFUSERS_SCHEDULER_KEYS,
    DIFFUSERS_SCHEDULER_KEYS_VERSION,
    REMOVED_CLASS_KEYS,
)

#: stabilityai/stable-diffusion-2's scheduler/scheduler_config.json (written by hand)
SD2_DDIM = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _init_keys(init) -> set[str]:
    return set(inspect.signature(init).parameters) - {"self", "kwargs"}


def _source_keys() -> dict[str, set[str]]:
    """Class name → config keys of every scheduler class in diffusers' source (the
    ``register_to_config`` ``__init__`` of ``schedulers/**/scheduling_*.py``), read without
    importing it: also the classes behind optional dependencies (torchsde, scipy) and the
    deprecated ones, which ``diffusers`` exports as dummies here or not at all."""
    root = Path(diffusers.schedulers.__file__).parent
    found = {}
    for path in sorted(root.rglob("scheduling_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for fn in node.body:
                registered = isinstance(fn, ast.FunctionDef) and any(
                    "register_to_config" in ast.unparse(d) for d in fn.decorator_list
                )
                if registered and fn.name == "__init__":
                    a = fn.args
                    args = a.posonlyargs + a.args + a.kwonlyargs
                    found[node.name] = {x.arg for x in args} - {"self", "kwargs"}
    return found


def test_the_key_table_holds_every_installed_diffusers_scheduler_key():
    per_class = {
        name: _init_keys(cls.__init__)
        for name in dir(diffusers)
        if name.endswith("Scheduler")
        and inspect.isclass(cls := getattr(diffusers, name))
        and issubclass(cls, diffusers.SchedulerMixin)
    }
    assert {"DDIMScheduler", "PNDMScheduler", "UniPCMultistepScheduler"} <= set(per_class)
    from_source = _source_keys()
    assert {"KarrasVeScheduler", "DPMSolverSDEScheduler"} <= set(from_source)
    for name, keys in from_source.items():
        per_class[name] = per_class.get(name, set()) | keys
    missing = {
        name: sorted(keys - DIFFUSERS_SCHEDULER_KEYS)
        for name, keys in per_class.items()
        if keys - DIFFUSERS_SCHEDULER_KEYS
    }
    assert not missing, (
        f"diffusers {diffusers.__version__} has scheduler config keys missing from "
        f"DIFFUSERS_SCHEDULER_KEYS (taken from {DIFFUSERS_SCHEDULER_KEYS_VERSION}): {missing}"
    )
    if diffusers.__version__ == DIFFUSERS_SCHEDULER_KEYS_VERSION:
        assert set().union(*per_class.values()) == DIFFUSERS_SCHEDULER_KEYS - REMOVED_CLASS_KEYS


@pytest.mark.parametrize("form", ["config", "folder"])
def test_stable_diffusion_2_ddim_config_loads_and_steps_as_diffusers(form, tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(SD2_DDIM))
    with pytest.warns(UserWarning, match=r"DDIMScheduler' config's key\(s\) \['skip_prk_steps'\]"):
        ours = (
            DDIMScheduler.from_config(SD2_DDIM)
            if form == "config"
            else DDIMScheduler.from_pretrained(tmp_path)
        )
    theirs = diffusers.DDIMScheduler.from_config(SD2_DDIM)
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps.tolist()[:4] + ours.timesteps.tolist()[-2:]:
        v = torch.randn(2, 4, 8, 8, generator=g)
        want = theirs.step(v, t, x)
        got = ours.step(v, t, x)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
        x = want.prev_sample


def test_own_class_keys_no_diffusers_scheduler_has_stay_refused():
    for cls in (DDIMScheduler, DDPMScheduler):
        config = {**SD2_DDIM, "_class_name": cls.__name__, "skip_prk_step": True}
        with (
            pytest.warns(UserWarning, match="skip_prk_steps"),
            pytest.raises(ConfigError, match=r"\['skip_prk_step'\].*no diffusers scheduler"),
        ):
            cls.from_config(config)


def test_a_ddim_config_diffusers_converted_from_ddpm_loads(tmp_path):
    """diffusers' ``DDIMScheduler.from_pretrained(ddpm_folder).save_config`` writes a
    ``DDIMScheduler`` config that keeps DDPM's ``variance_type``."""
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_config(tmp_path / "ddpm")
    converted = diffusers.DDIMScheduler.from_pretrained(tmp_path / "ddpm")
    converted.save_config(tmp_path / "ddim")
    saved = json.loads((tmp_path / "ddim" / CONFIG_NAME).read_text())
    assert saved["_class_name"] == "DDIMScheduler" and "variance_type" in saved
    with pytest.warns(UserWarning, match=r"\['variance_type'\]"):
        ours = DDIMScheduler.from_pretrained(tmp_path / "ddim")
    assert dict(ours.config) == {k: converted.config[k] for k in ours.config}
