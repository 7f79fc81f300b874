"""Reports: run folder -> report.md + PNGs; comparison report; format_table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from dibregman.report import format_table, write_comparison_report, write_run_report
from dibregman.run_folder import RunFolder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def make_run(root: Path, name: str, d: int = 2, critic: bool = True, steps: int = 40) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    div = "sq_hellinger" if critic else "reverse_kl"
    (run / "config.json").write_text(json.dumps(
        {"divergence": div, "teacher": "gmm8", "steps": steps, "batch_size": 256,
         "optim": {"lr": 1e-4, "betas": [0.0, 0.99]}}))
    stats = []
    for s in range(0, steps, 2):
        rec = {"step": s, "loss/generator": float(np.exp(-s / 20) + 0.1), "loss/fake_score": 1.0 / (s + 1),
               "ratio/omega_min": 0.1, "ratio/omega_mean": 1.0 + 0.01 * s, "ratio/omega_max": 3.0,
               "time/step_s": 0.01, "nonfinite/skipped": 0}
        if critic:
            rec |= {"loss/critic": -0.5 + 0.01 * s, "ratio/log_r_min": -2.0, "ratio/log_r_mean": -0.1,
                    "ratio/log_r_max": 1.5}
        if s == 10:
            del rec["loss/fake_score"]  # keys may be missing on some lines
        stats.append(rec)
    _write_jsonl(run / "stats.jsonl", stats)
    metrics = [{"step": s, "energy": 0.5 / (s + 1), "mmd": 1e-2 / (s + 1), "w1": 0.3, "mode_tv": 0.2,
                "off_mode": 0.05} for s in range(0, steps, 10)]
    _write_jsonl(run / "metrics.jsonl", metrics)
    centers = rng.normal(size=(4, d)) * 3
    teacher = centers[rng.integers(0, 4, 500)] + 0.3 * rng.normal(size=(500, d))
    student = centers[rng.integers(0, 4, 400)] + 0.5 * rng.normal(size=(400, d))
    student[0] = np.nan  # a diverged sample must not break the limits
    np.savez(run / "samples.npz", teacher=teacher, student=student, data=teacher[:300])
    final = {k: v for k, v in metrics[-1].items() if k != "step"}
    (run / "summary.json").write_text(json.dumps(
        {"name": name, "divergence": div, "metrics": final, "step_time_s": 0.0123, "nfe": 1}))
    return run


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    rgba = np.ascontiguousarray((img[..., :3] * 255).astype(np.uint32))
    packed = rgba[..., 0] << 16 | rgba[..., 1] << 8 | rgba[..., 2]
    assert np.unique(packed).size > 10  # not a single colour: axes, text and data were drawn


def linked_pngs(md: str) -> set[str]:
    return set(re.findall(r"\]\(([^)]+\.png)\)", md))


@pytest.mark.parametrize(("d", "critic"), [(2, True), (3, False)])
def test_run_report(tmp_path: Path, d: int, critic: bool) -> None:
    run = make_run(tmp_path, f"run_d{d}", d=d, critic=critic)
    path = write_run_report(run)
    assert path == run / "report.md"
    md = path.read_text()
    pngs = {p.name for p in run.glob("*.png")}
    assert pngs == {"samples.png", "losses.png", "ratio.png", "metrics.png"}
    for p in pngs:
        check_png(run / p)
    assert linked_pngs(md) == pngs
    assert f"# Run report: run_d{d}" in md
    assert "batch_size" in md and "optim.lr" in md
    assert f"{0.5 / 31:.4f}" in md  # final energy (step 30), formatted like format_table
    assert "0.0003" in md and "mmd" in md  # final mmd 1e-2/31
    assert ("loss/critic" in md) is False  # losses appear only in the figure, not as text
    assert ("projected on teacher PCs" in md) == (d > 2)
    try:
        from dibregman.metrics.toy import METRIC_DOC
    except ImportError:
        METRIC_DOC = {}
    for key, doc in METRIC_DOC.items():
        assert (f"- **{key}**: {doc}" in md) == (key != "nll")  # documented metrics that were measured


def test_run_report_missing_and_empty(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    (run / "stats.jsonl").write_text("")
    path = write_run_report(run)
    md = path.read_text()
    assert "# Run report: bare" in md
    assert not list(run.glob("*.png")) and not linked_pngs(md)
    # stats present but with a torn last line and no metrics: only what exists is drawn
    _write_jsonl(run / "stats.jsonl", [{"step": i, "loss/generator": 1.0 / (i + 1)} for i in range(3)])
    with (run / "stats.jsonl").open("a") as f:
        f.write('{"step": 2, "loss/gen')
    md = write_run_report(run).read_text()
    assert linked_pngs(md) == {"losses.png"}
    check_png(run / "losses.png")


def test_comparison_report(tmp_path: Path) -> None:
    runs = {"reverse_kl": make_run(tmp_path, "rkl", critic=False),
            "di-bregman (sq_hellinger)": make_run(tmp_path, "dib", critic=True)}
    rows = [
        {"method": "teacher (Heun)", "nfe": 35, "energy": 0.001, "mmd": 0.0002, "w1": 0.05},
        {"method": "reverse_kl", "nfe": 1, "energy": 0.0321, "mmd": 0.004, "w1": 0.2, "mode_tv": 0.3,
         "step_time_s": 0.011},
        {"method": "di-bregman", "nfe": 1, "energy": 0.0123, "mmd": 0.001, "w1": 0.1, "mode_tv": 0.1,
         "step_time_s": 0.014},
    ]
    out = tmp_path / "compare"
    path = write_comparison_report(out, rows, runs, title="toy comparison")
    md = path.read_text()
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"comparison_samples.png", "comparison_metrics.png", "comparison_ratio.png"}
    for p in pngs:
        check_png(out / p)
    assert linked_pngs(md) == pngs
    assert md.startswith("# toy comparison")
    for v in ("0.0321", "0.0123", "0.0110", "35"):
        assert v in md
    assert "(../rkl/report.md)" in md and "(../dib/report.md)" in md
    assert (runs["reverse_kl"] / "report.md").exists()  # linked reports are written when missing
    table = next(line for line in md.splitlines() if line.startswith("| teacher"))
    assert table.count("-") >= 2  # missing mode_tv / step_time_s for the teacher row


def test_format_table() -> None:
    rows = [{"method": "teacher", "nfe": 35, "mmd": 0.00012345},
            {"method": "student-long-name", "nfe": 1, "mmd": 3e-7, "w1": 1.5}]
    plain = format_table(rows, markdown=False)
    lines = plain.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["method", "nfe", "mmd", "w1"]
    assert lines[2].split()[-1] == "-"  # teacher has no w1
    assert "0.0001" in plain and "3e-07" in plain  # tiny nonzero values do not read as 0.0000
    assert " 35 " in lines[2] + " " and "1.5000" in lines[3]
    md = format_table(rows, columns=["method", "w1"])
    mlines = md.splitlines()
    assert mlines[0].startswith("| method") and set(mlines[1]) <= set("|-: ")
    assert len({len(line) for line in mlines}) == 1
    assert mlines[2].rstrip(" |").endswith("-")
    assert format_table([], columns=["a"], markdown=False).splitlines()[0] == "a"


# ------------------------------------------------------------------ what a reader sees (issue: figures)
def _border_is_blank(path: Path, px: int = 2) -> bool:
    """Nothing drawn touches the image's edge: no tick label or title is cut off."""
    img = imread(path)[..., :3]
    edges = np.concatenate([img[:px].reshape(-1, 3), img[-px:].reshape(-1, 3),
                            img[:, :px].reshape(-1, 3), img[:, -px:].reshape(-1, 3)])
    return bool((edges > 0.99).all())


def test_log_scale_labels_are_not_cut(tmp_path: Path) -> None:
    run = make_run(tmp_path, "cut", critic=True)
    stats = [{"step": s, "loss/critic": 1.39 + 0.001 * s, "loss/fake_score": 0.86 - 0.01 * s,
              "loss/generator": 1e-3 * 10 ** (s / 10)} for s in range(1, 40)]  # narrow, narrow, 4 decades
    _write_jsonl(run / "stats.jsonl", stats)
    write_run_report(run)
    for name in ("losses.png", "metrics.png", "samples.png"):
        assert _border_is_blank(run / name), name


def test_metric_curves_carry_the_teacher_reference(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from dibregman import report

    drawn: list[float] = []
    orig = Figure.savefig

    def spy(self, *args, **kwargs):  # the dashed reference lines of every axis, before saving
        for ax in self.axes:
            drawn.extend(float(line.get_ydata()[0]) for line in ax.get_lines() if line.get_linestyle() == "--")
        return orig(self, *args, **kwargs)

    run = make_run(tmp_path, "ref")
    summary = json.loads((run / "summary.json").read_text())
    summary["teacher_metrics"] = {"energy": 0.0123, "mmd": 0.00042, "w1": 0.0777}
    (run / "summary.json").write_text(json.dumps(summary))
    Figure.savefig = spy
    try:
        report._line_panels({"": RunFolder(run).evaluations}, ["energy", "mmd", "w1", "mode_tv"],
                            run / "m.png", "range", summary["teacher_metrics"])
    finally:
        Figure.savefig = orig
    assert sorted(drawn) == sorted([0.0123, 0.00042, 0.0777])  # one per metric the teacher has
    assert "dashed: the teacher's 35-NFE samples" in write_run_report(run).read_text()


def test_omega_is_drawn_normalised_with_the_clip_bounds() -> None:
    from dibregman.report import _omega_bounds
    from dibregman.train.config import divergence_from_spec

    cfg = {"divergence": "hellinger", "r_clip_min": 0.1, "r_clip_max": 20.0}
    lo, hi = _omega_bounds(cfg)
    om = divergence_from_spec("hellinger").omega(torch.log(torch.tensor([0.1, 20.0], dtype=torch.float64)))
    assert (lo, hi) == tuple(sorted(om.tolist())) and lo < 1 < hi
    assert _omega_bounds({"divergence": "reverse_kl", "r_clip_min": 0.1, "r_clip_max": 20.0}) == (1.0, 1.0)


def test_mixture_runs_get_the_per_mode_share_plot(tmp_path: Path) -> None:
    from dibregman.teachers import load_teacher

    gmm = load_teacher("gmm:ring8_imbalanced")
    runs = {}
    for name in ("reverse_kl", "hellinger"):
        run = make_run(tmp_path, name, critic=name != "reverse_kl")
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "teacher": "gmm:ring8_imbalanced",
                                                     "divergence": name, "r_clip_min": 0.1, "r_clip_max": 20}))
        if name == "reverse_kl":  # omega = h''(r) r = 1 for every sample
            _write_jsonl(run / "stats.jsonl", [{"step": s, "ratio/omega_min": 1.0, "ratio/omega_mean": 1.0,
                                                "ratio/omega_max": 1.0} for s in range(0, 40, 2)])
        x = gmm.sample(500, torch.Generator().manual_seed(0)).numpy()
        np.savez(run / "samples.npz", teacher=x, student=x[::-1].copy(), data=x)
        runs[name] = run
    md = write_run_report(runs["hellinger"]).read_text()
    assert "modes.png" in linked_pngs(md)
    check_png(runs["hellinger"] / "modes.png")
    md = write_comparison_report(tmp_path / "cmp", [{"method": "teacher", "nfe": 35}], runs).read_text()
    assert {"comparison_modes.png", "comparison_ratio.png"} <= linked_pngs(md)
    assert "reverse_kl: omega is constant, not drawn" in md


def test_dmd2_runs_are_labelled_dmd2() -> None:
    from dibregman.report import method_label

    assert method_label({"divergence": "reverse_kl", "gan_weight": 0.01}) == "reverse_kl+GAN (DMD2)"
    assert method_label({"divergence": "reverse_kl", "gan_weight": 0.0}) == "reverse_kl"
    assert method_label({"divergence": "hellinger", "gan_weight": 0.1}) == "hellinger+GAN 0.1"


def test_image_grids_are_labelled_with_class_and_caption(tmp_path: Path) -> None:
    from dibregman.report import _grid_labels

    labels = np.arange(80) % 10
    cols, rows, note = _grid_labels({"teacher": "net:fashion-mnist"}, labels, 10, 80)
    assert cols[:2] == ["t-shirt/top", "trouser"] and not rows and "column" in note
    cols, rows, note = _grid_labels({"teacher": "net:fashion-mnist-text", "prompts": ""}, labels, 10, 80)
    assert cols[9] == "ankle boot" and rows[0] == "a photo of a(n) …" and len(rows) == 8 and "caption" in note
    run = make_run(tmp_path, "img")
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, size=(80, 1, 8, 8))
    np.savez(run / "samples.npz", teacher=imgs, student=imgs, data=imgs, labels=labels)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "teacher": "net:fashion-mnist"}))
    md = write_run_report(run).read_text()
    assert "each column asks for the class above it" in md
    check_png(run / "samples.png")
    assert _border_is_blank(run / "samples.png")


def test_a_constant_omega_gets_no_figure(tmp_path: Path) -> None:
    run = make_run(tmp_path, "rkl", critic=False)
    _write_jsonl(run / "stats.jsonl", [{"step": s, "loss/generator": 1.0 / (s + 1), "ratio/omega_min": 1.0,
                                        "ratio/omega_mean": 1.0, "ratio/omega_max": 1.0} for s in range(10)])
    md = write_run_report(run).read_text()
    assert "ratio.png" not in linked_pngs(md) and "losses.png" in linked_pngs(md)
