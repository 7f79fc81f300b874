"""End-to-end runs of the real entry points (CLI and Python API) on tiny configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dibregman as db
from dibregman.cli import main
from dibregman.stats import read_jsonl
from dibregman.train.checkpoint import list_checkpoints

TINY = {"preset": "tiny", "progress": False}


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def test_distill_writes_a_complete_run(tmp_path):
    out = db.distill(out=str(tmp_path / "run"), divergence="jeffreys", **TINY)
    for name in ("config.json", "stats.jsonl", "metrics.jsonl", "summary.json", "samples.npz", "report.md",
                 "generator/model.safetensors", "generator/generator.json"):
        assert (out / name).is_file(), name
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [2, 4, 6]
    assert all(np.isfinite(r["ratio/omega_mean"]) and r["ratio/omega_min"] <= r["ratio/omega_max"] for r in stats)
    assert "ratio/log_r_mean" in stats[-1] and "loss/critic" in stats[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert {"mode_tv", "off_mode", "nll", "energy", "mmd", "w1"} <= set(summary["metrics"])
    assert set(summary["teacher_metrics"]) == set(summary["metrics"])  # the reference row, same metrics
    assert "teacher (Heun, 35 NFE)" in (out / "report.md").read_text()
    x = db.sample(out, 64, seed=1)
    assert x.shape == (64, 2) and torch.isfinite(x).all()
    # a sample depends on its seed and index only, not on how many are drawn
    assert torch.allclose(db.sample(out, 8, seed=1), x[:8], atol=1e-5)  # batch size changes BLAS rounding only


def test_reverse_kl_trains_no_critic(tmp_path):
    out = db.distill(out=str(tmp_path / "run"), divergence="reverse_kl", **TINY)
    last = list_checkpoints(out / "checkpoints")[-1]
    assert not (last / "critic.safetensors").exists()
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert all(r["ratio/omega_mean"] == 1.0 for r in stats)


def test_resume_is_bit_identical(tmp_path):
    # windows aligned (log, eval and checkpoint every 2) so that even the logs agree row for row
    opts = dict(TINY, divergence="forward_kl", omega_normalize="bins", steps=6, eval_every=2, checkpoint_every=2)
    full = db.distill(out=str(tmp_path / "full"), **opts)
    part = db.distill(out=str(tmp_path / "part"), **{**opts, "steps": 4})
    part = db.distill(out=str(tmp_path / "part"), resume=True, **opts)
    for ckpt_file in ("generator.safetensors", "fake_score.safetensors", "critic.safetensors", "ema.safetensors",
                      "omega_bins.safetensors"):
        a = load_file(str(list_checkpoints(full / "checkpoints")[-1] / ckpt_file))
        b = load_file(str(list_checkpoints(part / "checkpoints")[-1] / ckpt_file))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), ckpt_file
    def logged(run):  # everything but wall-clock times
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run / "stats.jsonl")]

    assert logged(full) == logged(part)
    assert read_jsonl(full / "metrics.jsonl") == read_jsonl(part / "metrics.jsonl")


def test_members_of_a_comparison_share_one_fit_and_train_as_if_alone(tmp_path, monkeypatch):
    """The second run of a process reuses the first one's fitted start (demo, compare): one fit, and every
    weight as in a run that fitted its own (the global RNG is left where the fit left it)."""
    import dibregman.train.components as components

    fits = []
    real = components.fit_network
    monkeypatch.setattr(components, "fit_network", lambda *a, **k: fits.append(1) or real(*a, **k))
    components._FITS.clear()
    first = db.distill(out=str(tmp_path / "a"), divergence="hellinger", **TINY)
    second = db.distill(out=str(tmp_path / "b"), divergence="hellinger", **TINY)
    assert len(fits) == 1
    a, b = (load_file(str(list_checkpoints(r / "checkpoints")[-1] / "critic.safetensors")) for r in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the critic's initial weights come after the fit's
    a, b = (load_file(str(r / "generator" / "model.safetensors")) for r in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)
    db.distill(out=str(tmp_path / "c"), divergence="hellinger", **{**TINY, "hidden": 24})
    assert len(fits) == 2  # another network: fitted anew


def test_refuses_to_overwrite_and_resume_with_other_config(tmp_path):
    out = str(tmp_path / "run")
    db.distill(out=out, steps=3, **{k: v for k, v in TINY.items()})
    assert run_cli("distill", "--preset", "tiny", "--out", out) == 2
    assert run_cli("distill", "--preset", "tiny", "--out", out, "--resume", "--hidden", "48") == 2


def test_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("distill", "--preset", "tiny", "--out", str(run), "--divergence", "power:0.5") == 0
    assert run_cli("sample", str(run), "--num", "10", "--out", str(tmp_path / "s.npz")) == 0
    assert np.load(tmp_path / "s.npz")["x"].shape == (10, 2)
    capsys.readouterr()
    assert run_cli("eval", str(run), "--num", "200", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["nfe"] == 35 and rows[1]["nfe"] == 1 and rows[0]["mode_tv"] < 0.2


def test_cli_dry_run_prints_resolved_config(capsys):
    assert run_cli("distill", "--preset", "tiny", "--divergence", "hellinger", "--dry-run") == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["divergence"] == "hellinger" and cfg["steps"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--divergence", "kl"], "unknown divergence"),
    (["--steps", "-3"], "positive integer"),
    (["--steps", "1.5"], "must be an integer"),
    (["--r-clip-min", "2"], "must contain 1"),
    (["--teacher", "gmm:nope"], "nope"),
    (["--config", "/nonexistent.json"], "config file not found"),
])
def test_cli_bad_input_gives_one_clear_line(tmp_path, capsys, argv, message):
    assert run_cli("distill", "--preset", "tiny", "--out", str(tmp_path / "r"), *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_train_teacher_then_distill_it(tmp_path):
    teacher = tmp_path / "teacher"
    assert run_cli("train-teacher", "--preset", "tiny", "--data", "moons", "--out", str(teacher)) == 0
    info = json.loads((teacher / "teacher" / "teacher.json").read_text())
    assert info["command"].startswith("dibregman train-teacher") and info["data"] == "moons"
    run = tmp_path / "run"
    assert run_cli("distill", "--preset", "tiny", "--teacher", f"net:{teacher / 'teacher'}", "--out", str(run)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["metrics"]) == {"energy", "mmd", "w1"}  # no exact density for a network teacher
    assert np.load(run / "samples.npz")["student"].shape == (128, 2)


def test_students_start_as_trainable_copies_of_the_teacher_network():
    from dibregman.artifacts import build_precond
    from dibregman.teachers import load_teacher
    from dibregman.train.components import build
    from dibregman.train.config import DistillConfig

    teacher = load_teacher("gmm:ring8")
    base = build_precond({"dim": 2, "hidden": 16, "depth": 1}, teacher.sigma_data).requires_grad_(False).eval()
    c = build(DistillConfig(divergence="logistic", hidden=16, depth=1), teacher, base, torch.device("cpu"))
    want = base.state_dict()
    for net in (c.generator.denoiser, c.fake_score):
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
        assert net.training and all(p.requires_grad for p in net.parameters())
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(net.parameters(), base.parameters(), strict=True))
    assert c.critic is not None and c.generator_loss.needs_critic


def test_cli_demo_compares_at_equal_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--preset", "tiny", "--out", str(out), "--divergences", "reverse_kl,jeffreys") == 0
    printed = capsys.readouterr().out
    assert "teacher (Heun, 35 NFE)" in printed and "student jeffreys (1 NFE)" in printed
    assert "mode-weight error (mode_tv, lower is better; one training seed): teacher" in printed
    report = (out / "report.md").read_text()
    assert "student reverse_kl (1 NFE)" in report and "Metrics of 128 samples" in report
    cfgs = [json.loads((out / d / "config.json").read_text()) for d in ("reverse_kl", "jeffreys")]
    assert {k: v for k, v in cfgs[0].items() if k not in ("divergence", "out")} == \
        {k: v for k, v in cfgs[1].items() if k not in ("divergence", "out")}
    assert (out / "comparison_samples.png").is_file()


def test_a_users_own_convex_h_runs_from_a_spec_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_family.py").write_text(
        "def chi_plus_kl(r):\n    return (r - 1) ** 2 / 2 + r * r.log()\n\n"
        "def concave(r):\n    return -(r ** 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = db.distill(out="run", divergence="py:my_family:chi_plus_kl", **TINY)
    stats = read_jsonl(out / "stats.jsonl")
    # omega = h''(r) r = r + 1 before normalisation: between the clip's 1.1 and 21
    assert all(1.1 - 1e-5 <= r["ratio/omega_min"] <= r["ratio/omega_max"] <= 21 + 1e-4 for r in stats)
    assert json.loads((out / "summary.json").read_text())["divergence"] == "py:my_family:chi_plus_kl"
    assert run_cli("distill", "--preset", "tiny", "--out", "r2", "--divergence", "py:my_family:concave") == 2
    assert run_cli("distill", "--preset", "tiny", "--out", "r3", "--divergence", "py:no_such_module:h") == 2


def test_a_run_leaves_the_callers_random_state_and_import_path_alone(tmp_path, monkeypatch):
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "family_in_cwd.py").write_text("def h(r):\n    return (r - 1) ** 2 / 2\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    path = list(sys.path)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    db.distill(out="run", divergence="py:family_in_cwd:h", **TINY)  # found in the working directory
    db.train_teacher(preset="tiny", out="teacher", progress=False)
    assert torch.equal(before, torch.get_rng_state())  # both seed torch for their networks, on a fork
    assert sys.path == path


def test_discriminator_form_and_gan_term_run_end_to_end(tmp_path):
    out = db.distill(out=str(tmp_path / "disc"), divergence="hellinger", generator_mode="discriminator", **TINY)
    stats = read_jsonl(out / "stats.jsonl")
    assert all("loss/fake_score" not in r and "loss/critic" in r for r in stats)  # the critic alone drives it
    out = db.distill(out=str(tmp_path / "gan"), divergence="reverse_kl", gan_weight=0.1, **TINY)
    assert all("loss/critic" in r for r in read_jsonl(out / "stats.jsonl"))  # a GAN term needs a critic


def test_resuming_a_finished_run_redoes_only_its_finish(tmp_path):
    out = db.distill(out=str(tmp_path / "run"), **TINY)
    rows = read_jsonl(out / "metrics.jsonl")
    weights = (out / "generator" / "model.safetensors").read_bytes()
    db.distill(out=str(tmp_path / "run"), resume=True, **TINY)
    assert read_jsonl(out / "metrics.jsonl") == rows  # no duplicated final row
    assert (out / "generator" / "model.safetensors").read_bytes() == weights


def test_a_config_object_and_a_preset_together_are_refused():
    from dibregman.train.config import ConfigError

    with pytest.raises(ConfigError, match="either a config object or a preset"):
        db.distill(db.DistillConfig(), preset="tiny")


def test_cli_list_names_what_the_options_accept(capsys):
    from dibregman.divergences import DIVERGENCES
    from dibregman.teachers.gmm import BUILTINS

    assert run_cli("list") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*DIVERGENCES, *BUILTINS, "moons", "py:<module>:<function>", "tiny"])


def test_adam_is_fused_on_the_cpu_and_falls_back_without_the_kernel(monkeypatch):
    from dibregman.train import components

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert components._adam(params, 1e-3, (0.0, 0.99), torch.device("cpu")).defaults["fused"]
    real = torch.optim.Adam

    def no_fused_cpu(*args, fused=None, **kwargs):  # torch 2.3: fused=True is CUDA-only
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda', 'xpu', 'privateuseone']")
        return real(*args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", no_fused_cpu)
    opt = components._adam(params, 1e-3, (0.0, 0.99), torch.device("cpu"))
    assert not opt.defaults["fused"]
