"""Markdown + PNG reports for one distillation run folder or a side-by-side comparison.

Figures are drawn on ``matplotlib.figure.Figure`` objects with an explicit ``FigureCanvasAgg``: no pyplot
global state, no backend switch visible to user code, no windows, safe to call from threads.

A run folder holds ``config.json``, ``stats.jsonl``, ``metrics.jsonl``, ``samples.npz`` and
``summary.json``; every one of them (and every key inside) is optional here: what is missing is skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

__all__ = ["format_table", "write_comparison_report", "write_run_report"]

METRIC_ORDER = ("energy", "mmd", "w1", "mode_tv", "off_mode", "nll", "fd", "kid", "precision", "recall", "label_acc")
MAX_POINTS = 4000  # per scatter panel; keeps figures light and fast


# ----------------------------------------------------------------------------------------- tables
def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        s = format(float(v), floatfmt)
        # a small nonzero value (e.g. an MMD of 3e-6) must not read as zero
        if math.isfinite(v) and v != 0 and s.strip("-+0.") == "":
            s = format(float(v), ".3g")
        return s
    return str(v)


def format_table(
    rows: Sequence[dict[str, Any]],
    columns: list[str] | None = None,
    floatfmt: str = ".4f",
    markdown: bool = True,
) -> str:
    """Aligned table of ``rows``; missing values are ``-``, numbers right-aligned, text left-aligned.

    ``columns`` defaults to the union of the rows' keys in first-seen order. ``markdown=False`` gives a
    plain table for the terminal in which every line has the same width.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c), floatfmt) for c in columns] for r in rows]
    if markdown:
        cells = [[s.replace("|", "\\|") for s in line] for line in cells]
    numeric = [
        all(isinstance(r.get(c), (int, float, np.number)) or r.get(c) is None for r in rows)
        and any(r.get(c) is not None for r in rows)
        for c in columns
    ]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    if markdown:
        widths = [max(w, 3) for w in widths]

    def fmt(vals: list[str]) -> list[str]:
        return [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric, strict=True)]

    if markdown:
        sep = [("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
        lines = [fmt(list(columns)), sep, *(fmt(line) for line in cells)]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    lines = [fmt(list(columns)), ["-" * w for w in widths], *(fmt(line) for line in cells)]
    return "\n".join("  ".join(line) for line in lines)


# ------------------------------------------------------------------------------------------ input
def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (run still writing) or blank lines are skipped."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _series(recs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pairs, dtype=float)
    return a[:, 0], a[:, 1]


def _keys(recs: list[dict[str, Any]], prefix: str = "") -> list[str]:
    return list(dict.fromkeys(k for r in recs for k in r if k != "step" and k.startswith(prefix)))


def _metric_keys(recs: list[dict[str, Any]]) -> list[str]:
    found = [k for k in _keys(recs) if _series(recs, k)[0].size]
    return [k for k in METRIC_ORDER if k in found] + [k for k in found if k not in METRIC_ORDER]


def _load_samples(run_dir: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(run_dir / "samples.npz") as z:
            arrs = {k: np.asarray(z[k], dtype=float) for k in ("data", "teacher", "student") if k in z}
    except (OSError, ValueError):
        return {}
    images = {k: a for k, a in arrs.items() if a.ndim == 4}  # [N, C, H, W]: drawn as grids, order kept
    if images:
        return images
    arrs = {k: a.reshape(len(a), -1) for k, a in arrs.items() if a.ndim >= 1}
    arrs = {k: a[np.isfinite(a).all(axis=1)][:MAX_POINTS] for k, a in arrs.items()}  # drop non-finite rows
    return {k: a for k, a in arrs.items() if len(a) and a.shape[1]}


# ---------------------------------------------------------------------------------------- figures
def _figure(n: int, ncols: int = 3, size: tuple[float, float] = (4.0, 3.0)) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(n, ncols))
    nrows = max(1, math.ceil(n / ncols))
    w, h = size[0] * ncols, size[1] * nrows
    fig = Figure(figsize=(w, h))
    # fixed margins in inches: a layout engine (constrained/tight) costs about half the drawing time
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=0.55 / h, top=1 - 0.5 / h,
                        wspace=0.4, hspace=0.6)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=100)
    return path.name


def _projector(ref: np.ndarray) -> tuple[Any, tuple[str, str], str]:
    """Identity for d <= 2; otherwise projection on the two leading principal components of ``ref``."""
    d = ref.shape[1]
    if d <= 2:
        return (lambda a: a if a.shape[1] == 2 else np.c_[a, np.zeros(len(a))]), ("x1", "x2"), ""
    mean = ref.mean(axis=0)
    vt = np.linalg.svd(ref - mean, full_matrices=False)[2][:2]
    labels = (f"PC1 of teacher samples (d={d})", f"PC2 of teacher samples (d={d})")
    return (lambda a: (a - mean) @ vt.T), labels, f" (d={d}, projected on teacher PCs)"


def _scatter_figure(panels: list[tuple[str, np.ndarray]], ref: np.ndarray, path: Path) -> tuple[str, str]:
    """Scatter panels with shared limits; returns (file name, projection note for captions)."""
    proj, (xl, yl), note = _projector(ref)
    pts = [(t, proj(a)) for t, a in panels if a.shape[1] == ref.shape[1]]
    allp = np.concatenate([p for _, p in pts])
    lo, hi = np.quantile(allp, [0.002, 0.998], axis=0)  # robust to a few far outliers
    mid, half = (lo + hi) / 2, 0.55 * max(float((hi - lo).max()), 1e-6)  # square limits: equal aspect fills
    fig, axes = _figure(len(pts), ncols=4, size=(3.6, 3.6))
    for ax, (title, p) in zip(axes, pts, strict=True):
        color = "C0" if "teacher" in title else "C2" if title == "data" else "C1"
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.35, linewidths=0, color=color)
        ax.set(xlim=(mid[0] - half, mid[0] + half), ylim=(mid[1] - half, mid[1] + half), title=title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_aspect("equal", adjustable="box")
    return _save(fig, path), note


def _image_figure(panels: list[tuple[str, np.ndarray]], path: Path, count: int = 80) -> tuple[str, str]:
    """Image sets ``[N, C, H, W]`` in [-1, 1] as grids side by side (the first ``count`` of each: the same
    seeds and labels in every panel)."""
    import torch

    from .grids import image_grid

    fig, axes = _figure(len(panels), ncols=len(panels), size=(4.5, 4.0))
    for ax, (title, x) in zip(axes, panels, strict=False):
        grid = image_grid(torch.as_tensor(x[:count]), nrow=10)
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _save(fig, path), f" (first {count}, sample i has label i mod 10 when class-conditional)"


def _sample_figure(panels: list[tuple[str, np.ndarray]], ref: np.ndarray, path: Path) -> tuple[str, str]:
    return _image_figure(panels, path) if ref.ndim == 4 else _scatter_figure(panels, ref, path)


def scatter_png(path: str | Path, x: np.ndarray, title: str = "samples") -> Path:
    """One scatter panel of ``x`` (PCA-projected beyond 2-D), for ``dibregman sample --out x.png``."""
    path = Path(path)
    _scatter_figure([(title, np.asarray(x))], np.asarray(x), path)
    return path


def _line_panels(runs: dict[str, list[dict[str, Any]]], keys: list[str], path: Path, log: str) -> str | None:
    """One panel per key, one line per run (a run labelled "" gets no legend)."""
    keys = [k for k in keys if any(_series(recs, k)[0].size for recs in runs.values())]
    if not keys:
        return None
    fig, axes = _figure(len(keys))
    for ax, k in zip(axes, keys, strict=True):
        ys = []
        for i, (label, recs) in enumerate(runs.items()):
            x, y = _series(recs, k)
            if x.size:
                ax.plot(x, y, lw=1.2, color=f"C{i}", label=label, marker="." if x.size < 30 else None)
                ys.append(y)
        _maybe_log(ax, np.concatenate(ys), log)
        ax.set(title=k, xlabel="step")
        ax.grid(alpha=0.3)
        if any(runs) and ax is axes[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _maybe_log(ax: Any, y: np.ndarray, mode: str) -> None:
    """``mode="positive"``: log-y if all finite values are > 0; ``"range"``: and they span > 10x."""
    f = y[np.isfinite(y)]
    if f.size and (f > 0).all() and (mode == "positive" or f.max() > 10 * f.min()):
        ax.set_yscale("log")
        if f.max() > 100 * f.min():  # two decade ticks exist: drop the crowded minor labels
            ax.yaxis.set_minor_formatter(NullFormatter())


def _band(ax: Any, recs: list[dict[str, Any]], stem: str, color: str, label: str) -> None:
    """Line for ``{stem}_mean`` and a shaded ``{stem}_min``..``{stem}_max`` band where both are logged."""
    x, mean = _series(recs, f"{stem}_mean")
    if not x.size:
        return
    ax.plot(x, mean, color=color, lw=1.2, label=f"{label} mean")
    xl, lo = _series(recs, f"{stem}_min")
    xh, hi = _series(recs, f"{stem}_max")
    if xl.size and xl.size == xh.size and np.array_equal(xl, xh):
        ax.fill_between(xl, lo, hi, color=color, alpha=0.2, lw=0, label=f"{label} min-max")


def _ratio_figure(recs: list[dict[str, Any]], path: Path) -> str | None:
    stems = [(s, t) for s, t in (("ratio/omega", "omega (generator weight)"), ("ratio/log_r", "log r"))
             if _series(recs, f"{s}_mean")[0].size]
    if not stems:
        return None
    fig, axes = _figure(len(stems), size=(5.0, 3.2))
    for ax, (stem, title) in zip(axes, stems, strict=True):
        _band(ax, recs, stem, "C0", stem.split("/")[1])
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- reports
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    return out


def _figure_md(figs: dict[str, str | None]) -> list[str]:
    return [line for t, f in figs.items() if f for line in (f"### {t}", "", f"![{t}]({f})", "")]


def _doc_lines(keys: list[str]) -> list[str]:
    """One explanatory line per documented metric; without the metrics module the tables show names only."""
    try:
        from dibregman.metrics.toy import METRIC_DOC  # lazy: keeps torch out of a plain report import
    except ImportError:
        return []
    return [f"- **{k}**: {METRIC_DOC[k]}" for k in keys if k in METRIC_DOC]


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and samples/losses/ratio/metrics PNGs into ``run_dir``; return the report path."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    summary = _read_json(run_dir / "summary.json")
    stats = _read_jsonl(run_dir / "stats.jsonl")
    mrecs = _read_jsonl(run_dir / "metrics.jsonl")
    samples = _load_samples(run_dir)
    name = summary.get("name") or config.get("name") or run_dir.name

    figs: dict[str, str | None] = {}
    if "teacher" in samples and "student" in samples:
        panels = [("data", samples["data"])] if "data" in samples else []
        panels += [("teacher (35 NFE)", samples["teacher"]), ("student (1 NFE)", samples["student"])]
        png, note = _sample_figure(panels, samples["teacher"], run_dir / "samples.png")
        figs["Samples" + note] = png
    figs["Losses"] = _line_panels({"": stats}, _keys(stats, "loss/"), run_dir / "losses.png", "positive")
    figs["Density ratio"] = _ratio_figure(stats, run_dir / "ratio.png")
    figs["Metrics"] = _line_panels({"": mrecs}, _metric_keys(mrecs), run_dir / "metrics.png", "range")

    final = dict(summary.get("metrics") or {}) or {k: v for k, v in (mrecs[-1] if mrecs else {}).items()
                                                     if k != "step"}
    lines = [f"# Run report: {name}", ""]
    facts = [("divergence", summary.get("divergence", config.get("divergence"))),
             ("nfe", summary.get("nfe")), ("step time (s)", summary.get("step_time_s")),
             ("last logged step", stats[-1]["step"] if stats else None)]
    lines += [" · ".join(f"{k}: {_cell(v, '.4g')}" for k, v in facts if v is not None), ""]
    if config:
        cfg = [{"key": k, "value": v} for k, v in _flatten(config).items()]
        lines += ["## Config", "", format_table(cfg, ["key", "value"], floatfmt=".4g"), ""]
    if final:
        rows = [{"method": "student (1 NFE)", **final}]
        if summary.get("teacher_metrics"):  # the reference row: the teacher's own 35-NFE sampler
            rows.insert(0, {"method": "teacher (Heun, 35 NFE)", **summary["teacher_metrics"]})
        lines += ["## Final metrics", "", format_table(rows), "", *_doc_lines(list(final)), ""]
    if any(figs.values()):
        lines += ["## Figures", "", *_figure_md(figs)]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def write_comparison_report(
    out_dir: str | Path,
    rows: list[dict[str, Any]],
    run_dirs: dict[str, Path],
    title: str = "Di-Bregman vs reverse-KL at equal budget",
    protocol: str | None = None,
) -> Path:
    """Comparison ``report.md`` + ``comparison_{samples,metrics,ratio}.png`` for runs keyed by label.

    ``rows`` are table rows ("method", "nfe", metric keys, "step_time_s"), typically the teacher's
    multi-step sampler first as the reference. Each run's own report is linked (and written if missing).
    ``protocol`` (how the numbers were measured) is printed under the table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {label: Path(d) for label, d in run_dirs.items()}
    samples = {label: _load_samples(d) for label, d in runs.items()}
    stats = {label: _read_jsonl(d / "stats.jsonl") for label, d in runs.items()}
    mrecs = {label: _read_jsonl(d / "metrics.jsonl") for label, d in runs.items()}

    figs: dict[str, str | None] = {}
    teacher = next((s["teacher"] for s in samples.values() if "teacher" in s), None)
    students = [(f"{label} (1 NFE)", s["student"]) for label, s in samples.items() if "student" in s]
    if teacher is not None and students:
        png, note = _sample_figure([("teacher (35 NFE)", teacher), *students], teacher,
                                   out_dir / "comparison_samples.png")
        figs["Samples" + note] = png

    keys = list(dict.fromkeys(k for recs in mrecs.values() for k in _metric_keys(recs)))
    figs["Metrics over training"] = _line_panels(mrecs, keys, out_dir / "comparison_metrics.png", "range")

    if any(_series(recs, "ratio/omega_mean")[0].size for recs in stats.values()):
        fig, (ax,) = _figure(1, size=(6.0, 3.5))
        for i, (label, recs) in enumerate(stats.items()):  # same colour per run as in the metrics figure
            _band(ax, recs, "ratio/omega", f"C{i}", label)
        ax.set(title="generator weight omega: mean and min-max", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figs["Density ratio"] = _save(fig, out_dir / "comparison_ratio.png")

    metric_cols = [k for k in METRIC_ORDER if any(k in r for r in rows)]
    other = [k for r in rows for k in r if k not in ("method", "nfe", "step_time_s", *metric_cols)]
    cols = ["method", "nfe", *metric_cols, *dict.fromkeys(other), "step_time_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = [f"# {title}", "", format_table(rows, cols), "", *([protocol, ""] if protocol else []),
             *_doc_lines(metric_cols), ""]
    if runs:
        lines += ["## Runs", ""]
        for label, d in runs.items():
            if not (d / "report.md").exists() and d.is_dir():
                write_run_report(d)
            lines.append(f"- [{label}]({Path(os.path.relpath(d / 'report.md', out_dir)).as_posix()})")
        lines.append("")
    if any(figs.values()):
        lines += ["## Figures", "", *_figure_md(figs)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
