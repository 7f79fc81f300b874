"""Issue 11, defects 15 and 19: a diverged skip-mode run stops; a re-export never leaves a half folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_export import tiny_generator
from test_reliability import snapshot

import dibregman.export as export_mod
from dibregman.artifacts import save_generator
from dibregman.export import export_diffusers
from dibregman.train.guard import SKIP_MIN_UPDATES, SKIP_RATIO, SKIP_WINDOW, NonFiniteError, NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_thread")


def _update(guard: NonFiniteGuard, net: torch.nn.Module, opt, finite: bool, step: int, tmp: Path) -> None:
    loss = net(torch.ones(1, 2)).sum() * (1.0 if finite else float("nan"))
    guard.step(opt, loss, net, "generator", step, 0.0, tmp)


def test_skip_mode_warns_at_the_first_skip_and_stops_a_diverged_run(tmp_path, capsys):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), 1e-3)
    guard = NonFiniteGuard("skip")
    for step in range(1, 31):
        _update(guard, net, opt, True, step, tmp_path)
    _update(guard, net, opt, False, 31, tmp_path)
    err = capsys.readouterr().err
    assert "warning: non-finite generator loss (nan) at step 31: update skipped" in err and err.count("\n") == 1
    with pytest.raises(NonFiniteError, match=r"31 of the last 61 updates were non-finite and skipped .* has diverged"):
        for step in range(32, 100):  # skipped share n / (30 + n): above 1/2 from the 31st skip on
            _update(guard, net, opt, False, step, tmp_path)
    assert guard.skipped == 31 and capsys.readouterr().err == ""  # the warning comes once
    assert (SKIP_WINDOW, SKIP_MIN_UPDATES, SKIP_RATIO) == (200, 50, 0.5)  # as docs/reliability.md says


def test_skip_mode_rides_out_stray_non_finite_updates(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), 1e-3)
    guard = NonFiniteGuard("skip")
    for step in range(1, 401):
        _update(guard, net, opt, step % 5 != 0, step, tmp_path)  # 20% skipped: a run that still learns
    assert guard.skipped == 80


def test_a_failed_re_export_keeps_the_earlier_export(tmp_path, monkeypatch):
    save_generator(tmp_path / "gen", tiny_generator(0), {"shape": [1, 8, 8]})
    out = export_diffusers(tmp_path / "gen", tmp_path / "export")
    before = snapshot(out)
    real = Path.rename

    def failing(self, target):
        if Path(target) == out:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(export_mod.Path, "rename", failing)
    with pytest.raises(OSError, match=r"no space left on device while writing .*export; free some space"):
        export_diffusers(tmp_path / "gen", tmp_path / "export")
    monkeypatch.undo()
    assert snapshot(out) == before  # the earlier export, whole, where it was
    assert sorted(os.listdir(tmp_path)) == ["export", "gen"]  # no temporary or aside folder left
    export_diffusers(tmp_path / "gen", tmp_path / "export")  # and a later export replaces it
    assert snapshot(out).keys() == before.keys()


def test_a_full_disk_error_without_a_file_still_says_what_to_do(tmp_path, capsys, monkeypatch):
    """Defect 9 in part: a library's ENOSPC without a file name (as matplotlib's for the report PNGs)."""
    import errno

    from test_reliability import assert_one_line_error

    import dibregman.cli as cli_mod

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli_mod, "run", full)
    with pytest.raises(SystemExit) as e:
        cli_mod.main(["list"])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "no space left on device while writing a run file",
                          "free some space", "--resume")


def test_non_utf8_stats_log_is_named_and_reports_skip_the_damage(tmp_path):
    from dibregman.run_folder import read_jsonl as _read_jsonl
    from dibregman.stats import read_jsonl

    log = tmp_path / "stats.jsonl"
    log.write_bytes(b'{"step": 1, "loss/generator": 0.5}\n{"step": 2, "x": "\xff\xfe"}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"stats.jsonl is not UTF-8 text .*move it aside"):
        read_jsonl(log)
    assert [r["step"] for r in _read_jsonl(log)] == [1, 2, 3]  # the report still draws what it can


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    import dibregman.io as io_mod
    from dibregman.report import write_run_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "stats.jsonl").write_text('{"step": 1, "loss/generator": 0.5}\n{"step": 2, "loss/generator": 0.4}\n')
    write_run_report(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".png", ".md")}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_mod.os, "fsync", full_disk)  # every write's last step fails, as on a full disk
    with pytest.raises(OSError, match=r"[Nn]o space left"):
        write_run_report(run)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".png", ".md")}
    assert after == before  # every report file as it was: none half-written
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_text_encoder_folder_with_pickled_weights_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from dibregman.text.encoder import load_text_encoder

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"only pickled weights .*safetensors"):
        load_text_encoder(str(tmp_path))
