"""DDP (2 Gloo processes on CPU, env:// as under torchrun) follows the single-process run with
the same global batch: same loss curve and weights; resumable across launches (slow test)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.weights import TINY_LIDM, TINY_LVDM

import echofast
from echofast.train import config_from_dict, train
from echofast.train.loop import load_checkpoint, read_log

SCRIPT = "import sys\nfrom echofast.train import main_train\nsys.exit(main_train(sys.argv[1:]))\n"


def make_config(out, *, steps, batch, accum=1, model="lidm"):
    return config_from_dict(
        {
            "model": {"type": model, "config": TINY_LIDM if model == "lidm" else TINY_LVDM},
            "output_dir": str(out),
            "data": {"source": "random", "num_workers": 0, "random_items": 12},
            "train": {
                "max_steps": steps,
                "batch_size": batch,
                "grad_accum": accum,
                "checkpoint_every": 2,
                "progress": False,
                "export_at_end": False,
            },
            "optim": {"warmup_steps": 2, "lr": 1e-3},
        }
    )


def without_key_biases(state: dict) -> dict:
    """Attention key biases have zero gradient in exact arithmetic: Adam turns their rounding
    noise into lr-sized steps (see test_training.py)."""
    return {k: v for k, v in state.items() if not k.endswith("to_k.bias")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, args: list[str], world: int = 2) -> None:
    """What ``torchrun --nproc_per_node 2`` does for env:// (without its agent process, which
    would cost another torch import on this 2-core machine): one process per rank with
    MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE set, running the CLI entry point."""
    script = tmp_path / "train_main.py"
    script.write_text(SCRIPT)
    root = str(Path(echofast.__file__).resolve().parents[1])
    base = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
    )
    base["PYTHONPATH"] = os.pathsep.join([root, base.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = []
    for rank in range(world):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(script), *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        codes = [p.wait(timeout=240) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(world))
    assert codes == [0] * world, logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run (batch 4) and a 2-rank run (batch 1 × accumulation 2): both have a
    global batch of 4, 4 steps, checkpoints at steps 2 and 4."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("ddp")
        train(make_config(tmp / "single", steps=4, batch=4))
        config = tmp / "ddp.json"
        config.write_text(json.dumps(make_config(tmp / "ddp", steps=4, batch=1, accum=2).to_dict()))
        _launch(tmp, ["lidm", "--config", str(config), "--no-progress"])
    finally:
        torch.set_num_threads(n)
    return tmp


def test_ddp_matches_single_process(runs):
    steps_s, loss_s = read_log(runs / "single" / "log.csv")
    steps_d, loss_d = read_log(runs / "ddp" / "log.csv")
    assert steps_s == steps_d == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(loss_d), torch.tensor(loss_s), rtol=1e-5, atol=1e-6)
    a = load_checkpoint(runs / "single" / "checkpoints" / "step-00000004.pt")
    b = load_checkpoint(runs / "ddp" / "checkpoints" / "step-00000004.pt")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert b["sampler"] == {"position": 16, "global_batch": 4, "seed": 42} == a["sampler"]
    assert set(a["model"]) == set(b["model"])
    for name, tensor in without_key_biases(a["model"]).items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    for name, tensor in without_key_biases(a["ema"]["shadow"]).items():
        torch.testing.assert_close(b["ema"]["shadow"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_ddp_trains_the_lvdm_like_one_process(tmp_path):
    """The LVDM's queries and keys of its one-token cross-attention take no part in the loss:
    2 ranks still train it (DDP stopped at the second step waiting for their gradients), with
    the single process's loss curve."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_config(tmp_path / "single", steps=2, batch=2, model="lvdm"))
        config = tmp_path / "ddp.json"
        cfg = make_config(tmp_path / "ddp", steps=2, batch=1, model="lvdm")
        config.write_text(json.dumps(cfg.to_dict()))
        _launch(tmp_path, ["lvdm", "--config", str(config), "--no-progress"])
    finally:
        torch.set_num_threads(n)
    steps_s, loss_s = read_log(tmp_path / "single" / "log.csv")
    steps_d, loss_d = read_log(tmp_path / "ddp" / "log.csv")
    assert steps_s == steps_d == [1, 2]
    torch.testing.assert_close(torch.tensor(loss_d), torch.tensor(loss_s), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_resume_is_exact(runs, tmp_path):
    """Resume the 2-rank run from its step-2 checkpoint in a new launch: same step-4 state."""
    config = tmp_path / "resumed.json"
    config.write_text(
        json.dumps(make_config(tmp_path / "resumed", steps=4, batch=1, accum=2).to_dict())
    )
    ckpt = runs / "ddp" / "checkpoints" / "step-00000002.pt"
    _launch(tmp_path, ["lidm", "--config", str(config), "--resume", str(ckpt), "--no-progress"])
    a = load_checkpoint(runs / "ddp" / "checkpoints" / "step-00000004.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step-00000004.pt")
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in a["ema"]["shadow"].items():
        torch.testing.assert_close(b["ema"]["shadow"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert (
        read_log(tmp_path / "resumed" / "log.csv")[1] == read_log(runs / "ddp" / "log.csv")[1][2:]
    )


@pytest.mark.parametrize("finished", [True, False])
def test_ranks_meet_before_the_group_is_destroyed_only_after_a_finished_run(finished, monkeypatch):
    """After a finished run every rank waits at a barrier before destroy_process_group (no rank
    exits while a peer may still have collectives in flight); after an error it leaves at once
    (a barrier would wait on peers stuck in another collective)."""
    import torch.distributed as tdist

    from echofast.train.loop import Dist

    calls = []
    monkeypatch.setattr(tdist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(tdist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    d = Dist("cpu")  # WORLD_SIZE unset: one process, no group of its own
    d.close(finished=finished)
    assert calls == []
    d.owns_group = True  # as a rank of a torchrun job that made the group
    d.close(finished=finished)
    assert calls == (["barrier", "destroy"] if finished else ["destroy"])
