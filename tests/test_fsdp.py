"""``parallel = fsdp`` (FSDP2 over gloo on CPU): two processes, each holding half of the trainable networks'
weights, gradients and Adam moments, train the same run as one process with the same global batch; their
checkpoints hold whole networks, so the run resumes on one process."""

from __future__ import annotations

import pytest
import torch
from test_dist import run, weights

from dibregman.train.config import ConfigError, DistillConfig, resolve

ARGS = ["distill", "--preset", "tiny", "--no-progress", "--divergence", "jeffreys", "--omega-normalize", "bins"]
IMAGES = ["distill", "--preset", "tiny-images", "--teacher", "net:fashion-mnist", "--critic-data", "data",
          "--no-progress"]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the same draws and mean gradients; only the order of float sums differs
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_sharded_processes_match_one_and_resume_on_one(tmp_path):
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    for res in (run(plain, 1, "--steps", "6", args=ARGS),
                run(sharded, 2, "--steps", "6", "--parallel", "fsdp", args=ARGS)):
        assert res.returncode == 0, res.stderr[-2000:]
    assert_close(weights(plain), weights(sharded))
    state = torch.load(sharded / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert "denoiser.backbone.emb_proj.0.weight" in state["optimizers"]["generator"]["state"]  # whole, by name
    # on one process (no torchrun): each loads the whole checkpoint, and continues as the plain run does
    for res in (run(plain, 1, "--steps", "8", "--resume", args=ARGS),
                run(sharded, 1, "--steps", "8", "--resume", "--parallel", "fsdp", args=ARGS)):
        assert res.returncode == 0, res.stderr[-2000:]
    assert_close(weights(plain), weights(sharded))
    assert sorted(p.name for p in (sharded / "checkpoints").iterdir())[-1] == "step-00000008"


@pytest.mark.slow  # 35 s: the U-Net path, a critic head on the fake score's features (a second forward method)
def test_sharded_u_nets_match_one_process(tmp_path):
    one, two = run(tmp_path / "one", 1, args=IMAGES), run(tmp_path / "two", 2, "--parallel", "fsdp", args=IMAGES)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    diff = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
    assert diff.max() < 1e-4, diff.max()  # measured 2e-6 after 4 steps at lr 1e-4


@pytest.mark.parametrize("option", [{"lora_rank": 4}, {"compile": True}])
def test_fsdp_refuses_what_it_does_not_shard(option):
    with pytest.raises(ConfigError, match="parallel = fsdp"):
        resolve(DistillConfig, preset="tiny", overrides={"parallel": "fsdp", **option})


def test_one_sharded_process_is_the_plain_run_in_bf16_too_and_the_mode_cannot_change_on_resume(tmp_path):
    # bf16 is the run's autocast under either mode: FSDP casts neither weights nor inputs (the noise level)
    import dibregman as db
    from dibregman.train.checkpoint import list_checkpoints

    opts = {"preset": "tiny", "precision": "bf16", "progress": False}
    plain = db.distill(out=str(tmp_path / "plain"), **opts)
    sharded = db.distill(out=str(tmp_path / "sharded"), parallel="fsdp", **opts)
    a, b = (weights(run) for run in (plain, sharded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "one process: the same arithmetic"
    assert not torch.distributed.is_initialized()  # the process group of one is gone with its run
    with pytest.raises(ConfigError, match=r"parallel: 'ddp' -> 'fsdp'"):
        db.distill(out=str(plain), parallel="fsdp", steps=8, resume=True, **opts)
    assert list_checkpoints(plain / "checkpoints")[-1].name == "step-00000006"


def test_each_block_of_a_network_is_a_unit_of_its_own():
    """``blocks``: the elements of the outermost module lists that hold weights (so a forward gathers one block at
    a time), never a module inside another unit, and nothing from a network without such lists."""
    from torch import nn

    from dibregman.nets.mlp import MLP
    from dibregman.nets.unet import UNet
    from dibregman.train.sharding import blocks

    unet = UNet(channels=1, resolution=16, base=8, mult=(1, 2), norm_groups=4)
    found = {id(b) for b in blocks(unet)}
    assert all(id(b) in found for b in [*unet.unet.down_blocks, *unet.unet.up_blocks])
    members = {id(m) for lst in unet.modules() if isinstance(lst, nn.ModuleList) for m in lst}
    assert found <= members  # elements of module lists only
    units = blocks(unet)
    assert not any(a is not b and any(b is m for m in a.modules()) for a in units for b in units)  # none nested
    mlp = MLP(2, hidden=8, depth=2)
    assert [id(b) for b in blocks(mlp)] == [id(b) for b in mlp.blocks]
    assert blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []
    named = nn.Module()  # an EDM network keeps its blocks by name
    named.enc = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2), "pool": nn.Identity()})
    assert [id(b) for b in blocks(named)] == [id(named.enc["a"]), id(named.enc["b"])]
