"""DMD's regression loss on paired teacher samples: the pairs are the teacher's own ODE map, and the term
trains the generator towards it."""

from __future__ import annotations

import json

import torch

import dibregman as db
from dibregman import sampling
from dibregman.losses import regression_loss
from dibregman.teachers import load_teacher
from dibregman.train.components import teacher_samples


def test_pairs_are_the_teachers_deterministic_map_of_their_noise():
    teacher = load_teacher("gmm:ring8_imbalanced")
    x, z = teacher_samples(teacher, 300, seed=5, device=torch.device("cpu"), batch=128, return_noise=True)
    assert torch.equal(x, teacher_samples(teacher, 300, seed=5, device=torch.device("cpu"), batch=128))
    again = sampling.sample(teacher, z[:50], num_steps=18, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max)
    assert torch.allclose(again.float(), x[:50], atol=1e-6)  # z is unit noise: the ODE starts at sigma_max * z


def test_regression_loss_is_the_mean_squared_error_per_sample():
    z = torch.randn(4, 3)
    target = torch.randn(4, 3)
    loss = regression_loss(lambda v, cond=None: 2 * v, z, target)
    assert loss.shape == (4,)
    assert torch.allclose(loss, ((2 * z - target) ** 2).mean(1))
    assert torch.all(regression_loss(lambda v, cond=None: target, z, target) == 0)


def test_the_regression_term_is_trained_in_a_run(tmp_path):
    fast = dict(preset="tiny", steps=40, log_every=10, eval_every=1000, checkpoint_every=1000, progress=False)
    run = db.distill(regression_weight=1.0, out=str(tmp_path / "run"), **fast)  # no evaluations mid-run
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    reg = [r["loss/regression"] for r in rows if "loss/regression" in r]
    assert len(reg) == 4 and reg[-1] < 0.7 * reg[0], reg
    plain = db.distill(regression_weight=0.0, out=str(tmp_path / "plain"), **fast)
    assert not any("loss/regression" in line for line in (plain / "stats.jsonl").read_text().splitlines())


def test_cosine_schedule_decays_the_generators_rate_and_resumes_exactly(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from dibregman.train.checkpoint import list_checkpoints

    def weights(run):
        last = list_checkpoints(run / "checkpoints")[-1]
        return {f"{f.stem}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    opts = dict(preset="tiny", steps=8, checkpoint_every=4, eval_every=1000, lr_schedule="cosine", progress=False)
    full = db.distill(out=str(tmp_path / "full"), **opts)
    shutil.copytree(full, tmp_path / "part")  # as if killed after the step-4 checkpoint
    shutil.rmtree(list_checkpoints(tmp_path / "part" / "checkpoints")[-1])
    part = db.distill(out=str(tmp_path / "part"), resume=True, **opts)
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(list_checkpoints(full / "checkpoints")[-1] / "state.pt", weights_only=False)
    lr = state["optimizers"]["generator"]["param_groups"][0]["lr"]
    assert 0 < lr < 5e-5  # the last update's rate: 1e-3 * (1 + cos(pi * 7/8)) / 2 = 3.8e-5
    const = weights(db.distill(out=str(tmp_path / "const"), **{**opts, "lr_schedule": "constant"}))
    assert any(not torch.equal(const[k], a[k]) for k in a if k.startswith("generator/"))
