"""EDM network snapshots: a pickle with the structure NVlabs/edm writes (built here without EDM's code) converts
into a teacher that computes EDM's denoiser, and a pickle naming anything else is refused before its payload runs.

The snapshots are made the way EDM's ``pickle.dump`` makes them: every EDM object reduces to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` (a function registered under that module name
only while pickling), ``meta`` holding ``module_src``, ``class_name`` and the object's ``__dict__``; torch's
``ModuleDict`` and real tensors pickle as themselves.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dibregman.data.images import UnsafePickleError
from dibregman.nets import arch_of, build_backbone
from dibregman.nets.edm_unet import SongUNet, UNetBlock
from dibregman.precond import Precond
from dibregman.teachers import load_teacher
from dibregman.teachers.edm import EDMImportError, convert_edm_pickle, converted_folder, read_edm_pickle

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "label_dim": 3, "augment_dim": 9,
        "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1}
NCSNPP = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "model_channels": 8, "channel_mult": [1, 2],
          "num_blocks": 1, "attn_resolutions": [4], "embedding_type": "fourier", "channel_mult_noise": 2,
          "encoder_type": "residual", "resample_filter": [1, 3, 3, 1]}


# --- building EDM-shaped pickles without EDM's code -----------------------------------------------------------


@contextlib.contextmanager
def edm_persistence() -> Iterator[None]:
    """``torch_utils.persistence`` importable while pickling, so pickle names its reconstruct function as EDM's
    snapshots do; removed again before anything is unpickled."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta: dict) -> Any:
        raise AssertionError("EDM's own loader must never be called")

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"  # pickle looks it up by name
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    saved = {name: sys.modules.get(name) for name in (pkg.__name__, mod.__name__)}
    sys.modules.update({pkg.__name__: pkg, mod.__name__: mod})
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class Persistent:
    """How ``torch_utils.persistence`` pickles an instance of an EDM class."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": self.module_src, "class_name": self.class_name,
                "state": self.state}
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


class Payload:
    """Pickles as the call ``func(*args)``: what a malicious pickle plants."""

    def __init__(self, func: Any, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class UnknownClass:
    """Any class a pickle might name (here: this test module's)."""


def as_edm(module: nn.Module, src: str) -> Any:
    """The pickled form of an EDM module tree: our layers carry EDM's class names and attributes."""
    state = dict(module.__dict__)  # persistence pickles the instance's __dict__
    state["_modules"] = {k: None if v is None else as_edm(v, src) for k, v in module._modules.items()}
    if isinstance(module, nn.ModuleDict):  # not an EDM class: pickled under torch's own class name
        container = nn.ModuleDict()
        container.__dict__.update(state)
        return container
    if isinstance(module, UNetBlock):
        state["skip_scale"] = np.float64(module.skip_scale)  # EDM keeps np.sqrt(0.5): a numpy scalar
    if isinstance(module, SongUNet):
        state["_init_args"], state["_init_kwargs"] = (), module.arch()
    return Persistent(type(module).__name__, state, src)


def snapshot(unet: SongUNet, marker: Path) -> dict[str, Any]:
    """``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}`` as EDM's training loop saves it."""
    src = f"open({str(marker)!r}, 'w').write('module_src ran')\nclass EDMPrecond: pass\n"  # must never run
    arch = unet.arch()
    precond_kwargs = {"img_resolution": arch["img_resolution"], "img_channels": arch["in_channels"],
                      "label_dim": arch["label_dim"], "use_fp16": False, "model_type": "SongUNet",
                      **{k: v for k, v in arch.items() if k not in ("img_resolution", "in_channels", "out_channels",
                                                                    "label_dim")}}
    ema = {"training": False, "_parameters": {}, "_buffers": {}, "_non_persistent_buffers_set": set(),
           "_forward_hooks": collections.OrderedDict(), "_modules": {"model": as_edm(unet.eval(), src)},
           "img_resolution": arch["img_resolution"], "img_channels": arch["in_channels"],
           "label_dim": arch["label_dim"], "use_fp16": False, "sigma_min": 0, "sigma_max": float("inf"),
           "sigma_data": 0.5, "_init_args": (), "_init_kwargs": precond_kwargs}
    return {"ema": Persistent("EDMPrecond", ema, src),
            "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}, src),
            "augment_pipe": Persistent("AugmentPipe", {"p": 0.12, "xflip": 1e8, "yflip": 1.0}, src),
            "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10-32x32.zip",
                               "use_labels": True, "xflip": False, "cache": True, "resolution": 8}}


def write_pickle(path: Path, obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    with edm_persistence():
        path.write_bytes(pickle.dumps(obj, protocol))
    return path


def fill(model: nn.Module) -> nn.Module:
    """Deterministic weights (no RNG), the same ones the golden values below were computed with."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            amp = 3.0 if name.startswith("map_label") else 0.3  # labels strong enough to show in the output
            p.copy_((amp * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i)).reshape(p.shape))
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 0.37).reshape(2, 3, 8, 8).float()
    return x, torch.tensor([0.3, 4.0]), torch.tensor([2, 0])


def edm_denoiser(unet: SongUNet, x: torch.Tensor, sigma: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
    """EDMPrecond.forward's math, written out: D = c_skip x + c_out F(c_in x, ln(sigma)/4, labels)."""
    sd, s = 0.5, sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt()
    return c_skip * x + c_out * unet(c_in * x, sigma.log() / 4, onehot)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


# --- the network ------------------------------------------------------------------------------------------------


def test_songunet_has_edms_layer_names_and_shapes():
    unet = SongUNet(**TINY)
    assert list(unet.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    assert list(unet.dec) == ["4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "8x8_up", "8x8_block0", "8x8_block1",
                              "8x8_aux_norm", "8x8_aux_conv"]
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert shapes["map_label.weight"] == [16, 3] and shapes["map_augment.weight"] == [16, 9]
    assert "map_augment.bias" not in shapes and shapes["map_layer1.weight"] == [64, 64]
    assert shapes["enc.8x8_conv.weight"] == [16, 3, 3, 3]
    assert shapes["enc.4x4_down.conv0.resample_filter"] == [1, 1, 2, 2]
    assert shapes["enc.4x4_down.skip.weight"] == [16, 16, 1, 1]  # resample_proj: a 1x1 projection when resampling
    assert shapes["enc.4x4_block0.qkv.weight"] == [96, 32, 1, 1]  # attention at 4x4
    assert "enc.8x8_block0.qkv.weight" not in shapes and "enc.8x8_block0.conv0.resample_filter" not in shapes
    assert shapes["dec.4x4_block0.norm0.weight"] == [64]  # 32 + a 32-channel skip
    assert shapes["dec.8x8_block0.conv0.weight"] == [16, 48, 3, 3]
    assert shapes["dec.8x8_aux_conv.weight"] == [3, 16, 3, 3]
    assert len(shapes) == 149  # as NVlabs/edm's SongUNet with these arguments

    ncsn = SongUNet(**NCSNPP)
    assert list(ncsn.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_aux_residual", "4x4_block0"]
    assert ncsn.state_dict()["map_noise.freqs"].shape == (8,)  # channel_mult_noise 2: 16 noise channels
    assert ncsn.state_dict()["enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 4, 4)
    assert build_backbone(arch_of(unet)).arch() == unet.arch() and arch_of(unet)["kind"] == "edm_songunet"


def test_denoiser_matches_values_computed_with_nvlabs_edm():
    """Golden values from NVlabs/edm's own EDMPrecond(SongUNet) with the same weights and inputs."""
    net = Precond(fill(SongUNet(**TINY))).eval()
    x, sigma, labels = inputs()
    with torch.no_grad():
        d, d_none = net(x, sigma, labels), net(x, sigma, None)
    torch.testing.assert_close(d[0, 0, 0, :4], torch.tensor([-0.05973288, 0.18175839, 0.40147084, 0.57229632]),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(d[1, 2, 7, -4:], torch.tensor([0.15711479, 0.15973116, 0.16028200, 0.15372857]),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(d_none[1, 1, 3, :4], torch.tensor([0.02615374, 0.02845011, 0.02948077, 0.02681697]),
                               atol=2e-6, rtol=0)
    w = torch.cos(torch.arange(d.numel(), dtype=torch.float64) * 1.3)
    assert d.double().abs().sum().item() == pytest.approx(101.76544952, rel=1e-5)
    assert (d.double().flatten() * w).sum().item() == pytest.approx(-0.68751210, abs=1e-4)
    assert (d - d_none).double().abs().sum().item() == pytest.approx(0.30974150, rel=1e-3)


# --- conversion -------------------------------------------------------------------------------------------------


def test_a_snapshot_converts_into_a_teacher_with_edms_denoiser(tmp_path, marker):
    unet = fill(SongUNet(**TINY)).eval()
    pkl = write_pickle(tmp_path / "network-snapshot-000100.pkl", snapshot(unet, marker))
    folder = convert_edm_pickle(pkl, tmp_path / "converted")
    assert not marker.exists()  # module_src was never executed

    teacher = load_teacher(f"net:{folder}")
    assert teacher.shape == (3, 8, 8) and teacher.num_classes == 3 and teacher.sigma_data == 0.5
    assert (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)  # EDM's sampling range within [0, inf)
    meta = teacher.meta
    assert meta["arch"] == {"kind": "edm_songunet", **unet.arch()} and meta["num_classes"] == 3
    assert meta["edm"]["precond"] == "EDMPrecond" and meta["edm"]["dataset_kwargs"]["path"] == "cifar10-32x32.zip"
    assert meta["source"]["edm_pickle"] == pkl.name and len(meta["source"]["sha256"]) == 64
    assert all(k.startswith("backbone.") for k in load_file(str(folder / "model.safetensors")))

    x, sigma, labels = inputs()
    onehot = F.one_hot(labels, 3).float()
    with torch.no_grad():
        reference = edm_denoiser(unet, x, sigma, onehot)
        torch.testing.assert_close(teacher(x, sigma, labels), reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(teacher(x, sigma, onehot), reference, atol=0, rtol=0)  # EDM-style label vectors
        no_label = edm_denoiser(unet, x, sigma, torch.zeros(2, 3))  # EDM's class_labels=None
        torch.testing.assert_close(teacher(x, sigma, None), no_label, atol=1e-6, rtol=0)
        torch.testing.assert_close(teacher(x, sigma, torch.tensor([3, 3])), no_label, atol=1e-6, rtol=0)
        assert (teacher(x, sigma, torch.tensor([1, 1])) - reference).abs().max() > 1e-4  # the label matters
        feats = teacher.network.features(x, sigma, labels)
    assert feats.shape == (2, teacher.network.backbone.feature_channels, 4, 4)


def test_the_rest_of_the_snapshot_comes_back_as_records(tmp_path, marker):
    pkl = write_pickle(tmp_path / "s.pkl", snapshot(SongUNet(**TINY), marker))
    snap = read_edm_pickle(pkl)
    assert snap["loss_fn"].class_name == "EDMLoss" and snap["loss_fn"].state["P_std"] == 1.2
    assert snap["augment_pipe"].class_name == "AugmentPipe" and snap["dataset_kwargs"]["use_labels"] is True
    enc = snap["ema"].state["_modules"]["model"].state["_modules"]["enc"]
    assert enc.class_name == "ModuleDict" and not isinstance(enc, nn.Module)  # a record, not torch's class
    assert not marker.exists()


def test_an_ncsnpp_snapshot_converts_too(tmp_path, marker):
    unet = SongUNet(**NCSNPP).eval()
    pkl = write_pickle(tmp_path / "ncsnpp.pkl", snapshot(unet, marker), protocol=2)
    teacher = load_teacher(f"net:{convert_edm_pickle(pkl, tmp_path / 'out')}")
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, sigma), edm_denoiser(unet, x, sigma, None), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unconditional"):
        teacher(x, sigma, torch.tensor([0, 1, 2]))


def test_the_edm_spec_converts_once_beside_the_pickle(tmp_path, marker):
    pkl = write_pickle(tmp_path / "edm-tiny.pkl", snapshot(fill(SongUNet(**TINY)), marker))
    folder = converted_folder(pkl)
    assert folder == tmp_path / "edm-tiny.teacher"
    first = load_teacher(f"edm:{pkl}")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_teacher(f"edm:{pkl}")  # read from the folder, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    x, sigma, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(first(x, sigma, labels), again(x, sigma, labels), atol=0, rtol=0)
        write_pickle(pkl, snapshot(SongUNet(**TINY), marker))  # other weights under the same name
        changed = load_teacher(f"edm:{pkl}")
        assert (changed(x, sigma, labels) - first(x, sigma, labels)).abs().max() > 1e-3
    assert not marker.exists()

    foreign = tmp_path / "other.pkl"
    foreign.write_bytes(pkl.read_bytes())
    converted_folder(foreign).mkdir()  # a folder this importer did not write is never overwritten
    with pytest.raises(EDMImportError, match="not a conversion of an EDM pickle"):
        load_teacher(f"edm:{foreign}")


# --- refusals ---------------------------------------------------------------------------------------------------


def _payloads(marker: Path) -> dict[str, tuple[Any, str]]:
    return {"os.system": (Payload(os.system, f"touch {marker}"), "system"),
            "builtins.exec": (Payload(builtins.exec, f"open({str(marker)!r}, 'w')"), "builtins.exec"),
            "builtins.eval": (Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
            "subprocess.Popen": (Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
            "unknown class": (UnknownClass(), "UnknownClass"),
            "torch module": (nn.Linear(2, 2), "torch.nn.modules.linear.Linear")}


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen", "unknown class",
                                  "torch module"])
@pytest.mark.parametrize("where", ["top", "inside the network"])
def test_a_pickle_naming_anything_else_is_refused_unrun(tmp_path, marker, kind, protocol, where):
    payload, named = _payloads(marker)[kind]
    snap = snapshot(SongUNet(**TINY), marker)
    if where == "top":
        snap["dataset_kwargs"]["path"] = payload
    else:  # deep in the pickle, after tensors have been read
        snap["ema"].state["_modules"]["model"].state["label_dropout"] = payload
    pkl = write_pickle(tmp_path / "evil.pkl", snap, protocol)
    for spec_or_call in (lambda: convert_edm_pickle(pkl, tmp_path / "out"), lambda: load_teacher(f"edm:{pkl}")):
        with pytest.raises(UnsafePickleError, match=f"{named}.*refusing") as info:
            spec_or_call()
        assert str(pkl) in str(info.value)
    assert not marker.exists() and not (tmp_path / "out").exists() and not converted_folder(pkl).exists()


def test_a_handwritten_os_system_pickle_is_refused(tmp_path, marker):
    pkl = tmp_path / "p0.pkl"
    pkl.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        read_edm_pickle(pkl)
    assert not marker.exists()


def test_storage_bytes_are_read_by_torchs_restricted_loader(tmp_path, marker):
    """EDM's ``torch.storage._load_from_bytes`` would ``torch.load`` them with pickled code enabled."""
    buf = io.BytesIO()
    torch.save(Payload(os.system, f"touch {marker}"), buf, _use_new_zipfile_serialization=False)
    snap = snapshot(SongUNet(**TINY), marker)
    snap["dataset_kwargs"]["path"] = Payload(torch.storage._load_from_bytes, buf.getvalue())
    pkl = write_pickle(tmp_path / "storage.pkl", snap)
    with pytest.raises(UnsafePickleError, match=r"weights_only=True"):
        read_edm_pickle(pkl)
    assert not marker.exists()


def _ema(snap):
    return snap["ema"]


def _model(snap):
    return snap["ema"].state["_modules"]["model"]


def _mutations() -> dict[str, tuple[Any, type[Exception], str]]:
    def vp(snap):
        _ema(snap).class_name = "VPPrecond"

    def adm(snap):
        _model(snap).class_name = "DhariwalUNet"

    def heads(snap):  # an attribute that EDM's SongUNet built from these kwargs would not have
        _model(snap).state["_modules"]["enc"].__dict__["_modules"]["4x4_block0"].state["num_heads"] = 2

    def missing(snap):
        layer = _model(snap).state["_modules"]["map_layer0"]
        layer.state["_parameters"] = {"weight": layer.state["_parameters"]["weight"]}

    def kwargs(snap):
        _model(snap).state["_init_kwargs"] = {**_model(snap).state["_init_kwargs"], "model_channels": 8}

    def unknown_kwarg(snap):
        _model(snap).state["_init_kwargs"] = {**_model(snap).state["_init_kwargs"], "mode": "dual"}

    def no_ema(snap):
        snap.pop("ema")

    return {"VPPrecond": (vp, EDMImportError, r"VPPrecond.*--precond=vp.*supported: EDMPrecond around SongUNet"),
            "DhariwalUNet": (adm, EDMImportError, r"DhariwalUNet.*supported: SongUNet"),
            "modified code": (heads, EDMImportError, r"enc\.4x4_block0\.num_heads is 2.*modified EDM code"),
            "missing tensor": (missing, EDMImportError, r"'map_layer0\.bias' is missing"),
            "wrong kwargs": (kwargs, EDMImportError, r"do not fit"),
            "unknown kwarg": (unknown_kwarg, EDMImportError, r"unknown SongUNet arguments \['mode'\]"),
            "no ema": (no_ema, EDMImportError, r"not an EDM network snapshot")}


@pytest.mark.parametrize("case", list(_mutations()))
def test_networks_other_than_edmprecond_songunet_are_refused_clearly(tmp_path, marker, case):
    mutate, error, message = _mutations()[case]
    snap = snapshot(SongUNet(**TINY), marker)
    mutate(snap)
    pkl = write_pickle(tmp_path / "other.pkl", snap)
    with pytest.raises(error, match=message):
        convert_edm_pickle(pkl, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_files_that_are_no_edm_pickle_are_refused_clearly(tmp_path):
    zipped = tmp_path / "state.pt"
    torch.save({"net": torch.zeros(2)}, zipped)
    with pytest.raises(EDMImportError, match="not a readable pickle"):
        read_edm_pickle(zipped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"net": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(EDMImportError, match="not an EDM network snapshot"):
        convert_edm_pickle(legacy, tmp_path / "out")  # its first pickle is torch's magic number
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(f"edm:{tmp_path / 'missing.pkl'}")
