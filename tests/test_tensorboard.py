"""The optional TensorBoard sink of ``Stats``: the event file holds exactly the JSONL rows."""

from __future__ import annotations

import sys

import pytest

from dibregman.stats import Stats, read_jsonl

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def test_tensorboard_scalars_equal_jsonl_rows(tmp_path):
    stats = Stats(tmp_path / "stats.jsonl", tensorboard=tmp_path / "tb")
    for step in (2, 4, 6):
        stats.add({"loss/gen": 0.5 * step, "ratio/omega_min": -step, "ratio/omega_max": step + 0.25})
        stats.add({"loss/gen": 0.5 * step + 1.0, "ratio/omega_min": 1.0, "ratio/omega_max": 0.0})
        stats.flush(step)
    stats.close()
    stats.close()  # idempotent

    rows = read_jsonl(tmp_path / "stats.jsonl")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    keys = {k for row in rows for k in row} - {"step"}
    assert set(acc.Tags()["scalars"]) == keys == {"loss/gen", "ratio/omega_min", "ratio/omega_max"}
    for key in keys:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows] == [2, 4, 6]
        # event files store float32
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_non_writing_rank_opens_no_event_file(tmp_path):
    stats = Stats(tmp_path / "stats.jsonl", write=False, tensorboard=tmp_path / "tb")
    stats.add({"a": 1.0})
    assert stats.flush(1) == {"step": 1, "a": 1.0}
    stats.close()
    assert not (tmp_path / "tb").exists() and not (tmp_path / "stats.jsonl").exists()


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'dibregman\[tensorboard\]'"):
        Stats(tmp_path / "stats.jsonl", tensorboard=tmp_path / "tb")
    Stats(tmp_path / "stats.jsonl")  # without the sink nothing is imported


def test_distill_writes_tensorboard_scalars(tmp_path):
    import dibregman as db

    out = db.distill(preset="tiny", tensorboard=True, out=str(tmp_path / "run"), progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/generator")]
    assert steps == [r["step"] for r in read_jsonl(out / "stats.jsonl")]
