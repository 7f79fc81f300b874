"""What a newcomer runs: demo --dataset and --preset agree, --dry-run shows the folder the run uses,
an image preset never distills the 2-D ring, and every option of --help says what it does."""

from __future__ import annotations

import json

import pytest

from dibregman.cli import build_parser, main


def dry_run(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as e:
        main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return json.loads(out)


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*args, "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("dibregman: error: ") and err.count("\n") == 1, err
    return err


def test_demo_dataset_keeps_its_teacher_under_another_preset(capsys):
    cfg = dry_run(capsys, "demo", "--dataset", "fashion-mnist", "--preset", "tiny-images")
    assert cfg["teacher"] == "net:fashion-mnist" and cfg["steps"] == 4  # the preset's schedule, the dataset's teacher
    assert cfg["out"] == "runs/demo-fashion-mnist"  # what the run really writes
    cfg = dry_run(capsys, "demo", "--dataset", "fashion-mnist-text", "--preset", "tiny-images")
    assert cfg["teacher"] == "net:fashion-mnist-text" and cfg["out"] == "runs/demo-fashion-mnist-text"
    cfg = dry_run(capsys, "demo", "--dataset", "fashion-mnist")
    assert cfg["teacher"] == "net:fashion-mnist" and cfg["out"] == "runs/demo-fashion-mnist" and cfg["steps"] == 300


def test_demo_refuses_a_teacher_that_contradicts_the_dataset(capsys):
    err = refused(capsys, "demo", "--dataset", "fashion-mnist", "--teacher", "gmm:ring8")
    assert "--dataset fashion-mnist distills net:fashion-mnist" in err and "gmm:ring8" in err
    err = refused(capsys, "demo", "--dataset", "ring", "--preset", "fashion-mnist")
    assert "--preset fashion-mnist" in err


def test_demo_out_and_teacher_from_flags_and_files(capsys, tmp_path):
    assert dry_run(capsys, "demo")["out"] == "runs/demo"
    assert dry_run(capsys, "demo", "--preset", "tiny")["out"] == "runs/demo"  # not the preset's distill folder
    assert dry_run(capsys, "demo", "--dataset", "fashion-mnist", "--out", "x")["out"] == "x"
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"out": str(tmp_path / "from_file"), "steps": 3}))
    cfg = dry_run(capsys, "demo", "--dataset", "fashion-mnist", "--config", str(conf))
    assert cfg["out"] == str(tmp_path / "from_file") and cfg["steps"] == 3
    cfg = dry_run(capsys, "demo", "--teacher", "gmm:grid25_imbalanced", "--preset", "tiny")  # no --dataset
    assert cfg["teacher"] == "gmm:grid25_imbalanced"


def test_an_image_preset_without_an_image_teacher_is_refused(capsys):
    for command in ("distill", "demo"):
        err = refused(capsys, command, "--preset", "tiny-images")
        assert "tiny-images" in err and "--teacher net:" in err
    assert dry_run(capsys, "distill", "--preset", "tiny-images", "--teacher", "net:fashion-mnist")["steps"] == 4


@pytest.mark.parametrize("command", ["distill", "train-teacher", "demo"])
def test_every_option_has_a_help_text_with_its_values(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        text = (action.help or "").split(" (default:")[0].strip()
        assert len(text) > 12, f"{command} {action.option_strings}: no help text"


def test_an_unknown_divergence_names_the_form_the_cli_takes(capsys):
    err = refused(capsys, "distill", "--divergence", "hellingr")
    assert "py:<module>:<function>" in err and "hellinger" in err


def test_list_says_which_teacher_each_preset_and_dataset_uses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "fashion-mnist (teacher net:fashion-mnist)" in out and "tiny-images (names no teacher" in out
    assert "demo --dataset: ring (gmm:ring8_imbalanced, preset demo)" in out and "tnet_*" in out
