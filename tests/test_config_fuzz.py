"""Property tests: no input, however odd, gets past config resolution or the CLI's argument handling as
anything but a valid config or one clear user error."""

from __future__ import annotations

import contextlib
import json
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dibregman.cli import main
from dibregman.train.config import PRESETS, ConfigError, DistillConfig, TeacherConfig, resolve, validate

# Function-scoped fixtures (capsys) are reset by hand inside each example.
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def keys(cls: type) -> st.SearchStrategy[str]:
    """Mostly real option names (so values reach the type and range checks), some typos and junk."""
    names = [f.name for f in fields(cls)]
    return st.sampled_from(names) | st.sampled_from([n.replace("_", "-") for n in names]) | st.text(max_size=10)


def typed_values(cls: type) -> st.SearchStrategy[object]:
    """Values of roughly the right type, including boundary and out-of-range ones."""
    return (json_values | st.integers(-3, 3) | st.floats(-2, 2) | st.sampled_from(
        ["0", "-1", "1e999", "nan", "inf", "0.5", "1", " 7", "power:0.5", "power:nan", "power:-1", "power:",
         "reverse_kl", "skip", "bins", "data", "teacher", "1" * 5000, "9" * 400 + ".0"])
            | st.sampled_from([10**400, -(10**400), 2**63]))  # beyond float range: OverflowError, not ValueError


@pytest.mark.parametrize("cls", [DistillConfig, TeacherConfig])
def test_resolve_returns_a_valid_config_or_a_config_error(cls):
    @FUZZ
    @given(st.dictionaries(keys(cls), typed_values(cls), max_size=6),
           st.none() | st.sampled_from(sorted(PRESETS["distill" if cls is DistillConfig else "teacher"])))
    def check(overrides: dict, preset: str | None) -> None:
        try:
            cfg = resolve(cls, preset=preset, overrides=overrides)
        except ConfigError as e:
            assert str(e) and "\n" not in str(e)
            return
        validate(cfg)  # what resolve returns passes the same checks again
        assert isinstance(cfg, cls)

    check()


def test_config_files_of_any_content(tmp_path):
    # the same, through a JSON config file: arbitrary documents, not only tables
    path = tmp_path / "c.json"

    @FUZZ
    @given(json_values | st.dictionaries(keys(DistillConfig), typed_values(DistillConfig), max_size=4))
    def check(doc: object) -> None:
        path.write_text(json.dumps(doc))
        with contextlib.suppress(ConfigError):  # anything else fails the test
            resolve(DistillConfig, file=path)

    check()


# --- the CLI ------------------------------------------------------------------------------------------

def _flags(cls: type) -> list[str]:
    return ["--" + f.name.replace("_", "-") for f in fields(cls)] + ["--preset", "--config"]


# argv strings cannot hold NUL (the OS passes C strings); everything else is fair game
argv_text = st.text(st.characters(blacklist_characters="\x00"), max_size=12) | st.sampled_from(
    ["-1", "0", "1e999", "nan", "tiny", "--", "-", "power:0.5", "true", "gmm:ring8", "x.toml"])


def _value(cls: type, flag: str) -> st.SearchStrategy[str]:
    """A value for ``flag``: plausible (its default, a small number, a choice) or random text."""
    name = flag[2:].replace("-", "_")
    default = {f.name: f.default for f in fields(cls)}.get(name)
    plausible = st.sampled_from([str(default), "tiny", "toy", "skip", "bins", "reverse_kl", "power:0.5"])
    numbers = st.integers(-2, 40).map(str) | st.floats(-0.5, 1.5, allow_nan=False).map(repr)
    return plausible | numbers | argv_text


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(["distill", "train-teacher", "demo"]))
    cls = TeacherConfig if command == "train-teacher" else DistillConfig
    args = [command]
    for flag in draw(st.lists(st.sampled_from(_flags(cls)), max_size=4)):
        args += [flag, draw(_value(cls, flag))]
    args.append("--dry-run")
    if draw(st.integers(0, 4)) == 0:  # now and then a stray token, or a flag left without its value
        args.insert(draw(st.integers(1, len(args))), draw(argv_text | st.sampled_from(_flags(cls))))
    return args


def test_cli_exits_0_with_json_or_2_with_one_line(capsys):
    @FUZZ
    @given(argv())
    def check(args: list[str]) -> None:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        out, err = capsys.readouterr()
        assert e.value.code in (0, 2), (args, err)
        assert "Traceback" not in err
        if e.value.code == 0:
            assert isinstance(json.loads(out), dict)
        else:
            assert err.startswith("dibregman: error: ") and err.count("\n") == 1, (args, err)

    check()
