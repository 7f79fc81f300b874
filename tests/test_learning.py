"""Distillation learns: a short run on the exact test bed must leave its starting network far behind, and
its critic must see the true density ratio. A wiring bug that stops learning fails here."""

from __future__ import annotations

import json

import pytest

import dibregman as db

# regression_weight 0: the distribution-matching update alone must learn (and its critic see log r)
OPTS = dict(teacher="gmm:ring8_imbalanced", regression_weight=0.0, fit_steps=300, hidden=64, depth=2, batch_size=256,
            eval_samples=20000, eval_every=10**6, log_every=50, checkpoint_every=10**6, progress=False)


def _final(run) -> tuple[dict, dict]:
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    diag = [r for r in rows if "diag/update_cos@0.5" in r][-1]
    return summary["metrics"], diag


@pytest.mark.parametrize("divergence", ["reverse_kl", "hellinger"])
def test_the_student_beats_its_starting_network_and_the_critic_sees_log_r(tmp_path, divergence):
    start, _ = _final(db.distill(steps=1, divergence=divergence, out=str(tmp_path / "start"), **OPTS))
    end, diag = _final(db.distill(steps=400, divergence=divergence, out=str(tmp_path / "end"), **OPTS))
    assert end["energy"] < 0.2 * start["energy"], (start, end)
    assert end["mode_tv"] < 0.6 * start["mode_tv"], (start, end)
    assert end["off_mode"] < 0.5 * start["off_mode"], (start, end)
    if divergence != "reverse_kl":  # reverse KL trains no critic
        assert diag["diag/log_r_corr@0.5"] > 0.3, diag  # 0.53 when written (1 thread)
