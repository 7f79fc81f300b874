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
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from .io import atomic_open, atomic_write_text
from .run_folder import RunFolder, read_json

__all__ = ["format_table", "method_label", "read_run", "write_comparison_report", "write_run_report"]

METRIC_ORDER = ("energy", "mmd", "w1", "mode_tv", "off_mode", "nll", "fd", "kid", "precision", "recall", "label_acc",
                "tnet_fd", "tnet_kid", "tnet_precision", "tnet_recall", "inception_fd", "inception_kid")
TEACHER_LABEL = "teacher (35 NFE)"
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


def method_label(config: dict[str, Any], divergence: str | None = None) -> str:
    """How tables name a run's method: its divergence, and ``+GAN (DMD2)`` for reverse KL with a GAN term
    (the ``dmd2`` preset), so a DMD2 run never reads as plain DMD."""
    div = divergence or str(config.get("divergence", "?"))
    gan = config.get("gan_weight") or 0
    if gan and div == "reverse_kl":
        return "reverse_kl+GAN (DMD2)"
    return f"{div}+GAN {gan:g}" if gan else div


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's records as plain Python values: ``config`` and ``summary`` (dicts, ``{}`` when
    missing), ``stats`` and ``metrics`` (lists of dicts with a ``step`` key, one per line of
    ``stats.jsonl`` / ``metrics.jsonl``; a torn last line of a run still writing is skipped), and
    ``samples`` (the arrays of ``samples.npz`` by name, ``{}`` before the run finished)."""
    return RunFolder(run_dir).records()


def _load_samples(run_dir: Path) -> dict[str, np.ndarray]:
    saved = RunFolder(run_dir).samples
    arrs = {k: np.asarray(saved[k], dtype=float) for k in ("data", "teacher", "student") if k in saved}
    images = {k: a for k, a in arrs.items() if a.ndim == 4}  # [N, C, H, W]: drawn as grids, order kept
    if images:
        return images
    arrs = {k: a.reshape(len(a), -1) for k, a in arrs.items() if a.ndim >= 1}
    arrs = {k: a[np.isfinite(a).all(axis=1)] for k, a in arrs.items()}  # drop non-finite rows
    return {k: a for k, a in arrs.items() if len(a) and a.shape[1]}


# ---------------------------------------------------------------------------------------- figures
def _figure(n: int, ncols: int = 3, size: tuple[float, float] = (4.0, 3.0)) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(n, ncols))
    nrows = max(1, math.ceil(n / ncols))
    w, h = size[0] * ncols, size[1] * nrows
    fig = Figure(figsize=(w, h))
    # fixed margins in inches: a layout engine (constrained/tight) costs about half the drawing time;
    # the saved file is cropped to what was drawn (bbox_inches="tight" in _save), so no label is cut
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=0.55 / h, top=1 - 0.5 / h,
                        wspace=0.45, hspace=0.6)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, path: Path) -> str:
    with atomic_open(path) as f:  # a full disk leaves the previous figure, never half of one
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)
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
    pts = [(t, proj(a[:MAX_POINTS])) for t, a in panels if a.shape[1] == ref.shape[1]]  # all go to the mode bars
    allp = np.concatenate([p for _, p in pts])
    lo, hi = np.quantile(allp, [0.002, 0.998], axis=0)  # robust to a few far outliers
    mid, half = (lo + hi) / 2, 0.55 * max(float((hi - lo).max()), 1e-6)  # square limits: equal aspect fills
    fig, axes = _figure(len(pts), ncols=4, size=(3.6, 3.6))
    students = 0
    for ax, (title, p) in zip(axes, pts, strict=True):
        students += not (title.startswith("teacher") or title == "data")
        color = _colour(title, max(students, 1))
        size = float(np.clip(8000 / max(len(p), 1), 2, 12))  # few points: larger dots, still visible
        ax.scatter(p[:, 0], p[:, 1], s=size, alpha=0.5 if len(p) < 1000 else 0.35, linewidths=0, color=color)
        ax.set(xlim=(mid[0] - half, mid[0] + half), ylim=(mid[1] - half, mid[1] + half),
               title=f"{title}, {len(p)} samples")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_aspect("equal", adjustable="box")
    return _save(fig, path), note


def _colour(title: str, i: int) -> str:
    """One colour per role in every figure: the teacher blue, the data grey, student i colour C<i>."""
    return "C0" if title.startswith("teacher") else "C7" if title == "data" else f"C{i}"


def _teacher_meta(spec: str | None) -> dict[str, Any]:
    """``teacher.json`` of a ``net:`` teacher (class names, caption templates) without loading weights."""
    if not isinstance(spec, str) or not spec.startswith("net:"):
        return {}
    arg = spec[4:]
    folder = Path(arg)
    if not folder.exists():
        from .assets import shipped

        folder = shipped(arg, "teacher") or folder
    return read_json(folder / "teacher.json")


def _grid_labels(config: dict[str, Any], labels: np.ndarray | None, ncols: int,
                 count: int) -> tuple[list[str], list[str], str]:
    """Column labels (the class each column asks for), row labels (a caption set's template per row)
    and the caption note of an image grid of ``count`` samples, ``ncols`` per row."""
    meta = _teacher_meta(config.get("teacher"))
    names = list(meta.get("class_names") or [])
    cols: list[str] = []
    if labels is not None and len(labels) >= ncols and labels.ndim == 1:
        lab = labels[:count].astype(int)
        if all((lab[i::ncols] == lab[i]).all() for i in range(ncols)):  # each column one class
            cols = [names[k] if 0 <= k < len(names) else f"class {k}" for k in lab[:ncols]]
    rows: list[str] = []
    text = meta.get("text") or {}
    prompts = str(config.get("prompts", "") or "")
    note = f" (first {count}; same seeds in every panel"
    if text:
        from .text.prompts import UNSEEN_TEMPLATES

        templates = list(text.get("templates") or []) if prompts == "" else (
            list(UNSEEN_TEMPLATES) if prompts == "unseen" else [])
        k = len(names)
        if templates and k == ncols:  # caption j = template j // K filled with class j % K: one row per template
            rows = [templates[(r * ncols // k) % len(templates)].replace("{a}", "a(n) …")
                    .replace("{noun}", "… (class name alone)") for r in range(-(-count // ncols))]
            note += "; sample i has caption i mod N: the row's template with the column's class"
        else:
            note += f"; sample i has prompt i mod N of {prompts or 'the training captions'}"
    elif cols:
        note += "; each column asks for the class above it"
    return cols, rows, note + ")"


def _image_figure(panels: list[tuple[str, np.ndarray]], path: Path, config: dict[str, Any] | None = None,
                  labels: np.ndarray | None = None, count: int = 80) -> tuple[str, str]:
    """Image sets ``[N, C, H, W]`` in [-1, 1] as grids side by side (the first ``count`` of each: the same
    seeds and conditions in every panel), columns labelled with their class, rows with their caption
    template for a text run."""
    import torch

    from .grids import image_grid

    config = config or {}
    h, w = panels[0][1].shape[2:]
    num_classes = len(set(labels.tolist())) if labels is not None and labels.ndim == 1 else 0
    ncols = num_classes if 2 <= num_classes <= 16 else 10
    cols, rows, note = _grid_labels(config, labels, ncols, count)
    nrows = -(-min(count, len(panels[0][1])) // ncols)
    cell = 0.42 if h <= 16 else 0.5  # inches per image: a 28x28 image at 100 dpi is about 0.5 inch
    gw, gh, gap = cell * ncols, cell * nrows * (h + 2) / (w + 2), 0.35  # one grid's size, inches
    fig = Figure(figsize=(len(panels) * (gw + gap), gh + 0.2))
    FigureCanvasAgg(fig)
    width = len(panels) * (gw + gap)
    axes = [fig.add_axes(((gap / 2 + i * (gw + gap)) / width, 0.0, gw / width, gh / (gh + 0.2)))
            for i in range(len(panels))]  # grids side by side; titles and labels outside are kept by _save
    rotate = max((len(c) for c in cols), default=0) > 2
    for i, (ax, (title, x)) in enumerate(zip(axes, panels, strict=False)):
        grid = image_grid(torch.as_tensor(x[:count]), nrow=ncols)
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=10, pad=(44 if rotate else 14) if cols else 6)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if cols:
            ax.set_xticks([2 + (w + 2) * c + w / 2 for c in range(ncols)], cols, fontsize=7,
                          rotation=60 if rotate else 0, ha="left" if rotate else "center")
            ax.xaxis.tick_top()
            ax.tick_params(length=0, pad=2)
        if rows and i == 0:
            ax.set_yticks([2 + (h + 2) * r + h / 2 for r in range(len(rows))], rows, fontsize=7)
            ax.tick_params(length=0)
    return _save(fig, path), note


def _sample_figure(panels: list[tuple[str, np.ndarray]], ref: np.ndarray, path: Path,
                   config: dict[str, Any] | None = None, labels: np.ndarray | None = None) -> tuple[str, str]:
    return _image_figure(panels, path, config, labels) if ref.ndim == 4 else _scatter_figure(panels, ref, path)


def scatter_png(path: str | Path, x: np.ndarray, title: str = "samples") -> Path:
    """One scatter panel of ``x`` (PCA-projected beyond 2-D), for ``dibregman sample --out x.png``."""
    path = Path(path)
    _scatter_figure([(title, np.asarray(x))], np.asarray(x), path)
    return path


def _mixture(config: dict[str, Any]) -> Any:
    """The analytic teacher of a ``gmm:`` run (exact weights and modes), or None."""
    spec = config.get("teacher")
    if not isinstance(spec, str) or not spec.startswith("gmm:"):
        return None
    try:
        from .teachers import load_teacher

        return load_teacher(spec)
    except (ImportError, OSError, ValueError):
        return None


def _mode_figure(gmm: Any, sets: list[tuple[str, np.ndarray]], path: Path) -> str | None:
    """Share of each set's samples in each mode (nearest component by likelihood) beside the mixture's
    weights, modes in decreasing weight, with +-2 binomial standard errors: the resampling spread of a
    share measured on that many samples."""
    import torch

    sets = [(t, a) for t, a in sets if a.ndim == 2 and a.shape[1] == gmm.means.shape[1] and len(a)]
    if not sets:
        return None
    w = gmm.weights.double().cpu().numpy()
    order = np.argsort(-w, kind="stable")
    k = len(w)
    fig, (ax,) = _figure(1, size=(max(6.0, 0.9 * k + 1.5), 3.6))
    width = 0.8 / len(sets)
    x = np.arange(k)
    students = 0
    for i, (title, a) in enumerate(sets):
        students += not (title.startswith("teacher") or title == "data")
        idx = gmm.assign(torch.as_tensor(a, dtype=torch.float64)).numpy()
        share = np.bincount(idx, minlength=k)[order] / len(a)
        se = np.sqrt(np.clip(share * (1 - share), 0, None) / len(a))
        tv = 0.5 * np.abs(share - w[order]).sum()
        color = _colour(title, students)
        ax.bar(x - 0.4 + width * (i + 0.5), share, width, yerr=2 * se, color=color, alpha=0.75,
               error_kw={"lw": 0.8, "capsize": 1.5}, label=f"{title} (mode_tv {tv:.3f}, n={len(a)})")
    ax.hlines(w[order], x - 0.45, x + 0.45, colors="k", lw=1.6, label="mixture weight")
    ax.set_xticks(x, [f"mode {j}\nw={w[j]:.3f}" for j in order], fontsize=8)
    ax.set(ylabel="share of samples", title="samples per mode against the mixture's weights (bars: +-2 s.e.)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _short(v: float, _pos: Any = None) -> str:
    return f"{v:.3g}"


def _short_25(v: float, _pos: Any = None) -> str:
    """Minor log ticks: only 2x and 5x a power of ten get a label (no crowding near the decades)."""
    return f"{v:.3g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""


def _line_panels(runs: dict[str, list[dict[str, Any]]], keys: list[str], path: Path, log: str,
                 reference: dict[str, Any] | None = None) -> str | None:
    """One panel per key, one line per run (a run labelled "" gets no legend); ``reference`` values
    (the teacher's own metrics) are drawn as a dashed line on their panel."""
    keys = [k for k in keys if any(_series(recs, k)[0].size for recs in runs.values())]
    if not keys:
        return None
    reference = {k: v for k, v in (reference or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    fig, axes = _figure(len(keys))
    for ax, k in zip(axes, keys, strict=True):
        ys = []
        for i, (label, recs) in enumerate(runs.items()):
            x, y = _series(recs, k)
            if x.size:
                ax.plot(x, y, lw=1.2, color=f"C{i + 1}", label=label or "student",
                        marker="." if x.size < 30 else None)
                ys.append(y)
        if k in reference:
            ax.axhline(reference[k], color="k", ls="--", lw=1.0, label=TEACHER_LABEL)
            ys.append(np.array([reference[k]]))
        _maybe_log(ax, np.concatenate(ys), log)
        ax.set(title=k, xlabel="step")
        ax.grid(alpha=0.3)
        if ax is axes[0] and (any(runs) or reference):
            ax.legend(fontsize=7)
    return _save(fig, path)


def _maybe_log(ax: Any, y: np.ndarray, mode: str) -> None:
    """``mode="positive"``: log-y if all finite values are > 0; ``"range"``: and they span > 10x. Tick
    labels are short plain numbers (0.82, 1.4, 1e-03), minor ones only where no two decades show."""
    f = y[np.isfinite(y)]
    if f.size and (f > 0).all() and (mode == "positive" or f.max() > 10 * f.min()):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_short))
        few = f.max() <= 100 * f.min()  # fewer than two decade ticks may show: label 2x and 5x too
        ax.yaxis.set_minor_formatter(FuncFormatter(_short_25) if few else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)


def _band(ax: Any, recs: list[dict[str, Any]], stem: str, color: str, label: str,
          scale: np.ndarray | None = None) -> None:
    """Line for ``{stem}_mean`` and a shaded ``{stem}_min``..``{stem}_max`` band where both are logged;
    ``scale`` (per logged step) divides all three (omega after normalisation)."""
    x, mean = _series(recs, f"{stem}_mean")
    if not x.size:
        return
    div = scale if scale is not None and scale.shape == mean.shape else 1.0
    ax.plot(x, mean / div, color=color, lw=1.2, label=f"{label} mean")
    xl, lo = _series(recs, f"{stem}_min")
    xh, hi = _series(recs, f"{stem}_max")
    if xl.size and xl.size == xh.size and np.array_equal(xl, xh) and np.array_equal(xl, x):
        ax.fill_between(xl, lo / div, hi / div, color=color, alpha=0.2, lw=0, label=f"{label} min-max")


def _omega_bounds(config: dict[str, Any]) -> tuple[float, float] | None:
    """``omega`` at the ratio clip ``[r_clip_min, r_clip_max]``: the bounds its values sit between
    (before normalisation), or None when the divergence cannot be read."""
    try:
        import torch

        from .train.config import divergence_from_spec

        div = divergence_from_spec(str(config["divergence"]))
        lr = torch.log(torch.tensor([float(config["r_clip_min"]), float(config["r_clip_max"])], dtype=torch.float64))
        lo, hi = sorted(div.omega(lr).tolist())
    except (ImportError, KeyError, TypeError, ValueError):
        return None
    return lo, hi


def _omega_panel(ax: Any, recs: list[dict[str, Any]], config: dict[str, Any], color: str, label: str) -> None:
    """omega after normalisation: divided by the logged batch mean (exact for ``omega_normalize =
    batch``; for ``bins`` the running bin means differ a little), raw for ``none``; the clip bounds
    ``omega(r_clip_min)``, ``omega(r_clip_max)`` after the same division as dashed lines."""
    x, mean = _series(recs, "ratio/omega_mean")
    norm = str(config.get("omega_normalize", "batch"))
    scale = mean if norm != "none" and x.size and (mean > 0).all() else None
    _band(ax, recs, "ratio/omega", color, label, scale)
    bounds = _omega_bounds(config)
    if bounds is not None and x.size:
        clip = f"[{config['r_clip_min']:g}, {config['r_clip_max']:g}]"
        for i, b in enumerate(bounds):
            ax.plot(x, b / (scale if scale is not None else 1.0), color=color, ls="--", lw=0.8,
                    label=None if i else f"omega at the r clip {clip}")
    what = {"batch": "omega / batch mean", "bins": "omega / batch mean (bins normalise per noise bin)",
            "none": "omega (not normalised)"}.get(norm, "omega")
    ax.set(title=f"{what}: mean, min-max", xlabel="step")


def _constant_omega(recs: list[dict[str, Any]]) -> bool:
    """omega the same for every sample and step (reverse KL: omega = 1): nothing to draw."""
    vals = np.concatenate([_series(recs, f"ratio/omega_{k}")[1] for k in ("min", "max", "mean")])
    return bool(vals.size) and float(np.ptp(vals)) <= 1e-9 * max(1.0, float(np.abs(vals).max()))


def _ratio_figure(recs: list[dict[str, Any]], path: Path, config: dict[str, Any] | None = None) -> str | None:
    config = config or {}
    has = {s: _series(recs, f"{s}_mean")[0].size > 0 for s in ("ratio/omega", "ratio/log_r")}
    has["ratio/omega"] = has["ratio/omega"] and not _constant_omega(recs)  # reverse KL: omega = 1, nothing to see
    if not any(has.values()):
        return None
    fig, axes = _figure(sum(has.values()), size=(5.0, 3.2))
    it = iter(axes)
    if has["ratio/omega"]:
        ax = next(it)
        _omega_panel(ax, recs, config, "C0", "omega")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if has["ratio/log_r"]:
        ax = next(it)
        _band(ax, recs, "ratio/log_r", "C0", "log r")
        for key in ("r_clip_min", "r_clip_max"):
            if isinstance(config.get(key), (int, float)) and config[key] > 0:
                ax.axhline(math.log(config[key]), color="k", ls="--", lw=0.8,
                           label=f"clip: log {config[key]:g}")
        ax.set(title="log r (critic's estimate, after clipping)", xlabel="step")
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
    try:  # lazy: keeps torch out of a plain report import
        from dibregman.metrics.images import IMAGE_METRIC_DOC
        from dibregman.metrics.toy import METRIC_DOC
    except ImportError:
        return []
    docs = {**METRIC_DOC, **IMAGE_METRIC_DOC}
    return [f"- **{k}**: {docs[k]}" for k in keys if k in docs]


def _labels(run_dir: Path) -> np.ndarray | None:
    return RunFolder(run_dir).samples.get("labels")


_DIAGNOSTICS = (("fake_score_err", "fake score error |D_F - D_q|^2\n/ |D_T - D_q|^2 (1: teacher copy)"),
                ("update_cos", "cos(D_F - D_T, exact D_q - D_T)"),
                ("log_r_corr", "corr(critic log r, true log r)"),
                ("log_r_true", "true log r = log q/p at students"))


def _diagnostics_figure(recs: list[dict[str, Any]], path: Path) -> str | None:
    """The exact variety diagnostics of an analytic-teacher run (``metrics/exact.py``): one panel per
    quantity, one line per noise level, over training."""
    rows = [r for r in recs if any(k.startswith("diag/") for k in r)]
    names = [(n, t) for n, t in _DIAGNOSTICS if any(k.startswith(f"diag/{n}@") for r in rows for k in r)]
    if not names:
        return None
    levels = sorted({k.split("@")[1] for r in rows for k in r if k.startswith("diag/")}, key=float)
    fig, axes = _figure(len(names), ncols=2)
    for ax, (name, title) in zip(axes, names, strict=True):
        for i, s in enumerate(levels):
            x, y = _series(rows, f"diag/{name}@{s}")
            if x.size:
                ax.plot(x, y, lw=1.2, marker=".", color=colormaps["viridis"](i / max(len(levels) - 1, 1)),
                        label=f"sigma {s}")
        if name == "fake_score_err":
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and samples/losses/ratio/metrics PNGs into ``run_dir``; return the report path."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    config, summary, stats, mrecs = run.config, run.summary, run.stats, run.evaluations
    samples = _load_samples(run_dir)
    labels = _labels(run_dir)
    name = summary.get("name") or config.get("name") or run_dir.name
    label = method_label(config, summary.get("divergence"))
    nfe = summary.get("nfe") or config.get("student_steps", 1)

    figs: dict[str, str | None] = {}
    if "teacher" in samples and "student" in samples:
        panels = [("data", samples["data"])] if "data" in samples else []
        panels += [(TEACHER_LABEL, samples["teacher"]), (f"student {label} ({nfe} NFE)", samples["student"])]
        png, note = _sample_figure(panels, samples["teacher"], run_dir / "samples.png", config, labels)
        figs["Samples" + note] = png
        gmm = _mixture(config) if samples["teacher"].ndim == 2 else None
        if gmm is not None:
            figs["Samples per mode"] = _mode_figure(gmm, panels, run_dir / "modes.png")
    figs["Losses"] = _line_panels({"": stats}, _keys(stats, "loss/"), run_dir / "losses.png", "range")
    figs["Density ratio"] = _ratio_figure(stats, run_dir / "ratio.png", config)
    figs["Where variety is lost: fake score and critic against the student's exact denoiser and log r "
         "(analytic teachers; docs/benchmarks.md)"] = _diagnostics_figure(stats, run_dir / "diagnostics.png")
    figs["Metrics (dashed: the teacher's 35-NFE samples, same metric)"] = _line_panels(
        {"": mrecs}, _metric_keys(mrecs), run_dir / "metrics.png", "range", summary.get("teacher_metrics"))

    final = dict(summary.get("metrics") or {}) or {k: v for k, v in (mrecs[-1] if mrecs else {}).items()
                                                     if k != "step"}
    lines = [f"# Run report: {name}", ""]
    facts = [("method", label),
             ("nfe", summary.get("nfe")), ("step time (s)", summary.get("step_time_s")),
             ("last logged step", stats[-1]["step"] if stats else None)]
    lines += [" · ".join(f"{k}: {_cell(v, '.4g')}" for k, v in facts if v is not None), ""]
    if config:
        cfg = [{"key": k, "value": v} for k, v in _flatten(config).items()]
        lines += ["## Config", "", format_table(cfg, ["key", "value"], floatfmt=".4g"), ""]
    if final:
        rows = [{"method": f"student {label} ({nfe} NFE)", **final}]
        if summary.get("teacher_metrics"):  # the reference row: the teacher's own 35-NFE sampler
            rows.insert(0, {"method": "teacher (Heun, 35 NFE)", **summary["teacher_metrics"]})
        lines += ["## Final metrics", "", format_table(rows), "",
                  *([summary["protocol"], ""] if summary.get("protocol") else []), *_doc_lines(list(final)), ""]
    if any(figs.values()):
        lines += ["## Figures", "", *_figure_md(figs)]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
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
    folders = {label: RunFolder(d) for label, d in runs.items()}
    stats = {label: f.stats for label, f in folders.items()}
    mrecs = {label: f.evaluations for label, f in folders.items()}
    configs = {label: f.config for label, f in folders.items()}
    summaries = {label: f.summary for label, f in folders.items()}
    first = next(iter(configs.values()), {})
    reference = next((s["teacher_metrics"] for s in summaries.values() if s.get("teacher_metrics")), None)

    figs: dict[str, str | None] = {}
    teacher = next((s["teacher"] for s in samples.values() if "teacher" in s), None)
    students = [(f"{method_label(configs[label], label)} ({configs[label].get('student_steps', 1)} NFE)", s["student"])
                for label, s in samples.items() if "student" in s]
    if teacher is not None and students:
        labels = next((lab for lab in (_labels(d) for d in runs.values()) if lab is not None), None)
        panels = [(TEACHER_LABEL, teacher), *students]
        png, note = _sample_figure(panels, teacher, out_dir / "comparison_samples.png", first, labels)
        figs["Samples" + note] = png
        gmm = _mixture(first) if teacher.ndim == 2 else None
        if gmm is not None:
            figs["Samples per mode (the mode-weight metric mode_tv, drawn)"] = _mode_figure(
                gmm, panels, out_dir / "comparison_modes.png")

    keys = list(dict.fromkeys(k for recs in mrecs.values() for k in _metric_keys(recs)))
    figs["Metrics over training (dashed: the teacher's 35-NFE samples)"] = _line_panels(
        mrecs, keys, out_dir / "comparison_metrics.png", "range", reference)

    with_omega = [label for label, recs in stats.items() if _series(recs, "ratio/omega_mean")[0].size]
    constant = [label for label in with_omega if _constant_omega(stats[label])]
    with_omega = [label for label in with_omega if label not in constant]
    if with_omega:
        fig, axes = _figure(len(with_omega), ncols=min(len(with_omega), 3), size=(4.6, 3.2))
        colour = {label: f"C{i + 1}" for i, label in enumerate(stats)}  # as in the metrics figure
        for ax, label in zip(axes, with_omega, strict=True):
            _omega_panel(ax, stats[label], configs[label], colour[label], label)
            ax.set_title(f"{label}: {ax.get_title()}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        caption = "Generator weight omega after normalisation, with the ratio clip's bounds"
        if constant:
            caption += f" ({', '.join(constant)}: omega is constant, not drawn)"
        figs[caption] = _save(fig, out_dir / "comparison_ratio.png")

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
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
