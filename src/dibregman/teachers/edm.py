"""EDM network snapshots (NVlabs/edm ``network-snapshot-*.pkl`` and its released ``edm-*.pkl``) as teachers:
read once without running any code they carry, converted into a teacher folder (safetensors + JSON).

What such a file holds: EDM's training loop ``pickle.dump``-s CPU copies of its objects::

    {"ema": EDMPrecond, "loss_fn": EDMLoss, "augment_pipe": AugmentPipe | None, "dataset_kwargs": dict}

Each EDM class is decorated by ``torch_utils.persistence``, which pickles an instance as the call
``torch_utils.persistence._reconstruct_persistent_obj(meta)``: ``meta["module_src"]`` is the source of the
Python module defining the class (EDM's loader ``exec``-s it), ``meta["class_name"]`` its name and
``meta["state"]`` the instance's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``,
plain attributes). The rest is ordinary pickle: ``torch.nn.ModuleDict`` by class name, parameters as
``torch._utils._rebuild_parameter`` of ``_rebuild_tensor_v2`` of a storage that ``torch.save`` serialised into
bytes (``torch.storage._load_from_bytes``), numpy scalars (``skip_scale = np.sqrt(0.5)``), ``OrderedDict``.

``EDMUnpickler`` resolves exactly those names, to stand-ins, and refuses every other global before it is
looked up (nothing is imported): ``os.system``, ``builtins.exec``, ``subprocess.Popen``, EDM's own classes by
name... A persistent object becomes a ``Record`` (class name and state); ``module_src`` is dropped unread,
never compiled. Storage bytes go through ``torch.load(weights_only=True)``, torch's restricted unpickler,
never the ``torch.load`` of EDM's ``_load_from_bytes``. Containers (``ModuleDict``) become Records too.

The records are then mapped onto our modules: ``ema`` must be an ``EDMPrecond`` (our ``Precond`` computes
its c_skip, c_out, c_in and c_noise = ln(sigma) / 4) around a ``SongUNet`` (DDPM++ / NCSN++, ours in
``nets/edm_unet.py``), rebuilt from the pickled ``init_kwargs``; each pickled layer must have our layer's
class name and plain attributes, and the tensors must match our state dict key for key and shape for shape.
"""

from __future__ import annotations

import _compat_pickle
import collections
import hashlib
import io
import json
import math
import pickle
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from ..nets.edm_unet import SongUNet
from ..precond import Precond
from ..safe_pickle import UnsafePickleError, latin1_bytes, numpy_globals
from .trained import META_FILE, WEIGHTS_FILE, NetworkTeacher, save_teacher
from .trained import load_teacher as load_folder

Tensor = torch.Tensor

PRECONDS = ("EDMPrecond",)
MODELS = ("SongUNet",)
_OTHER_PRECONDS = {"VPPrecond": "--precond=vp", "VEPrecond": "--precond=ve", "iDDPMPrecond": "--precond=iddpm"}
_HOW = "convert a snapshot of EDM's `train.py --precond=edm --arch=ddpmpp` or `--arch=ncsnpp`"


class EDMImportError(ValueError):
    """An EDM pickle that is readable but not one this importer converts (another architecture, damage)."""


class Record:
    """A pickled object's class name and ``__dict__``; its class is never imported, let alone run.

    Persistent EDM objects are made by ``_persistent_record``; pickled torch containers (``ModuleDict``...)
    by a subclass per container standing in for the class (pickle's NEWOBJ + BUILD: ``__new__``, then
    ``__setstate__``)."""

    class_name = ""

    def __init__(self, class_name: str = "", state: dict[str, Any] | None = None):
        if not isinstance(class_name, str) or not isinstance(state, dict | None):
            raise UnsafePickleError("a pickled module record without a class name and a dict of state")
        self.class_name = class_name or type(self).class_name
        self.state: dict[str, Any] = state if state is not None else {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"a pickled {type(self).class_name} has state of type {type(state).__name__}, "
                                    "not the dict a torch module pickles")
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.class_name!r}, {len(self.state)} attributes)"


def _container(name: str) -> type[Record]:
    return type(name, (Record,), {"class_name": name})


class _PlainDict(dict):
    """``dnnlib.util.EasyDict`` (a dict with attribute access) as a plain dict."""


def _persistent_record(meta: Any) -> Record:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the class name and state,
    drops ``module_src`` unread (EDM would ``exec`` it; our own modules take its place)."""
    if not (isinstance(meta, dict) and isinstance(meta.get("class_name"), str) and isinstance(meta.get("state"), dict)
            and meta.get("type", "class") == "class"):
        raise UnsafePickleError("a torch_utils.persistence object without the class_name and state of an EDM "
                                "persistent class; refusing it")
    return Record(meta["class_name"], dict(meta["state"]))


def _storage_from_bytes(data: Any) -> Any:
    """Stands in for ``torch.storage._load_from_bytes`` (which calls ``torch.load(weights_only=False)``): the
    bytes are one storage in torch's legacy format, read by torch's restricted unpickler."""
    if not isinstance(data, bytes | bytearray):
        raise UnsafePickleError(f"torch.storage._load_from_bytes of a {type(data).__name__}, not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation: the legacy format is made of them
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsafePickleError(f"a tensor storage in it is refused by torch.load(weights_only=True) "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise UnsafePickleError(f"torch.storage._load_from_bytes gave a {type(storage).__name__}, not a storage")
    return storage


def _tensor(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False,
            backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` of a storage made by ``_storage_from_bytes``, without hooks."""
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise UnsafePickleError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
    if backward_hooks:
        raise UnsafePickleError("a pickled tensor carries backward hooks; an EDM snapshot's never do")
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsafePickleError(f"a pickled tensor with metadata of type {type(metadata).__name__}")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict(), metadata)


def _parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> Tensor:
    """``torch._utils._rebuild_parameter``: only the tensor is wanted (it is copied into our module)."""
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise UnsafePickleError("a pickled parameter that is not a plain tensor")
    return data


@cache
def _allowed() -> dict[tuple[str, str], Callable[..., Any]]:
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch._utils", "_rebuild_tensor_v2"): _tensor,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
        ("builtins", "bytearray"): bytearray,
        ("dnnlib.util", "EasyDict"): _PlainDict,
        ("_codecs", "encode"): latin1_bytes,  # how protocol <= 2 pickles bytes (storages), latin-1 only
        ("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray,
    }
    for name in ("ModuleDict", "ModuleList", "Sequential"):
        allowed["torch.nn.modules.container", name] = _container(name)
    npg = numpy_globals()
    for prefix in ("numpy.core", "numpy._core"):  # pickles written under numpy 1 or 2
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
            allowed[f"{prefix}.{module}", name] = npg[name]
    return allowed


class EDMUnpickler(pickle.Unpickler):
    """Resolves only the globals an EDM snapshot needs (module docstring); any other is refused unimported."""

    def __init__(self, file: IO[bytes], path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles name Python 2's modules (__builtin__.set); map them as pickle's fix_imports does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _allowed().get((module, name))
        if found is None:
            raise UnsafePickleError(f"{self.path} asks to load {module}.{name}, which an EDM network snapshot never "
                                    "needs; refusing to unpickle it (nothing it names was imported or run)")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.path} uses pickle persistent ids (a torch.save file?), which an EDM "
                                "snapshot written by pickle.dump never holds")


def read_edm_pickle(path: str | Path) -> Any:
    """Unpickle an EDM snapshot safely: persistent objects come back as ``Record``s, tensors as tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle {str(path)!r} does not exist; check the path")
    with open(path, "rb") as f:
        try:
            return EDMUnpickler(f, path).load()
        except UnsafePickleError as e:
            msg = str(e)
            raise UnsafePickleError(msg if str(path) in msg else f"{path}: {msg}") from None
        except Exception as e:  # truncated, not a pickle, a zip written by torch.save...
            raise EDMImportError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); an EDM snapshot is "
                                 "written by pickle.dump (network-snapshot-*.pkl)") from None


def _flat_tensors(rec: Record, prefix: str, out: dict[str, Tensor], where: Path) -> None:
    """A state dict (``<module path>.<name>`` -> tensor) from a Record tree, as ``nn.Module.state_dict``
    would list it: parameters, then persistent non-None buffers, then submodules."""
    s = rec.state
    skip = set(s.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        entries = s.get(group) or {}
        if not isinstance(entries, dict):
            raise EDMImportError(f"{where}: {prefix or 'the network'} has {group} of type {type(entries).__name__}")
        for name, t in entries.items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise EDMImportError(f"{where}: {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t
    for name, child in _children(rec, prefix, where).items():
        if child is not None:
            _flat_tensors(child, f"{prefix}{name}.", out, where)


def _children(rec: Record, prefix: str, where: Path) -> dict[str, Record | None]:
    children = rec.state.get("_modules") or {}
    bad = [k for k, v in children.items() if v is not None and not isinstance(v, Record)] if isinstance(
        children, dict) else ["_modules"]
    if bad:
        raise EDMImportError(f"{where}: submodule {prefix}{bad[0]} is not a pickled module")
    return children


def _same(a: Any, b: Any) -> bool:
    flags = isinstance(a, bool | np.bool_), isinstance(b, bool | np.bool_)
    if any(flags):
        return all(flags) and bool(a) == bool(b)
    if isinstance(a, int | float | np.number) and isinstance(b, int | float | np.number):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _check_layers(rec: Record, module: nn.Module, prefix: str, where: Path) -> None:
    """Each pickled layer is ours by class name, and its plain attributes (channels, groups, eps, heads,
    skip_scale, up/down...) have our values: a snapshot from modified EDM code is refused, not misread."""
    name = prefix.rstrip(".") or "the network"
    if rec.class_name != type(module).__name__:
        raise EDMImportError(f"{where}: {name} is a {rec.class_name} in the snapshot where EDM's SongUNet has a "
                             f"{type(module).__name__}; the snapshot was made by modified EDM code")
    for key, value in rec.state.items():
        if key.startswith("_") or key == "training" or not isinstance(value, bool | int | float | str | np.generic):
            continue
        if hasattr(module, key) and not _same(value, getattr(module, key)):
            raise EDMImportError(f"{where}: {name}.{key} is {value!r} in the snapshot but {getattr(module, key)!r} "
                                 "in EDM's SongUNet built from its init_kwargs; the snapshot was made by modified "
                                 "EDM code")
    ours = dict(module.named_children())
    for child_name, child in _children(rec, prefix, where).items():
        if child is None:
            continue
        if child_name not in ours:
            raise EDMImportError(f"{where}: the snapshot has a layer {prefix}{child_name} that EDM's SongUNet built "
                                 "from its init_kwargs lacks; the snapshot was made by modified EDM code")
        _check_layers(child, ours[child_name], f"{prefix}{child_name}.", where)


def _number(state: dict[str, Any], key: str, default: float, where: Path) -> float:
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise EDMImportError(f"{where}: the EDMPrecond's {key} is {value!r}, not a number")
    return float(value)


def network_from_snapshot(snapshot: Any, where: str | Path = "the snapshot") -> tuple[Precond, dict[str, Any]]:
    """Our ``Precond(SongUNet)`` with the snapshot's EMA weights, and what the teacher folder records.

    Refuses (``EDMImportError``, naming what is supported) anything but EDMPrecond around SongUNet."""
    where = Path(where)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("ema"), Record):
        got = sorted(map(str, snapshot)) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise EDMImportError(f"{where} is not an EDM network snapshot: expected a dict whose 'ema' is EDM's "
                             f"network; got {got}")
    ema = snapshot["ema"]
    if ema.class_name not in PRECONDS:
        flag = _OTHER_PRECONDS.get(ema.class_name)
        why = (f" (EDM's {flag}: another noise parametrisation)" if flag else "")
        raise EDMImportError(f"{where}: the network is a {ema.class_name}{why}; supported: "
                             f"{', '.join(PRECONDS)} around {', '.join(MODELS)}: {_HOW}")
    model = _children(ema, "", where).get("model")
    if not isinstance(model, Record) or model.class_name not in MODELS:
        found = model.class_name if isinstance(model, Record) else type(model).__name__
        extra = " (ADM, EDM's --arch=adm)" if found == "DhariwalUNet" else ""
        raise EDMImportError(f"{where}: the EDMPrecond wraps a {found}{extra}; supported: {', '.join(MODELS)} "
                             f"(DDPM++ / NCSN++): {_HOW}")
    kwargs, args = model.state.get("_init_kwargs"), model.state.get("_init_args")
    if not isinstance(kwargs, dict) or args:
        raise EDMImportError(f"{where}: the SongUNet records no keyword-only init_kwargs "
                             "(persistence's _record_init_args was off?); cannot rebuild it")
    try:
        backbone = SongUNet.from_arch(dict(kwargs))
    except ValueError as e:
        raise EDMImportError(f"{where}: {e}") from None
    if backbone.arch()["out_channels"] != backbone.channels:
        raise EDMImportError(f"{where}: the SongUNet maps {backbone.channels} channels to "
                             f"{backbone.arch()['out_channels']}; an EDMPrecond's network outputs its input's channels")
    es = ema.state
    for key, ours in (("img_channels", backbone.channels), ("img_resolution", backbone.resolution),
                      ("label_dim", backbone.label_dim)):
        if key in es and es[key] != ours:
            raise EDMImportError(f"{where}: the EDMPrecond's {key} is {es[key]!r} but its SongUNet's is {ours}")
    sigma_data = _number(es, "sigma_data", 0.5, where)
    if not math.isfinite(sigma_data) or sigma_data <= 0:
        raise EDMImportError(f"{where}: the EDMPrecond's sigma_data is {sigma_data}, not a positive number")
    # EDM's sampler clips its schedule [0.002, 80] to the network's [sigma_min, sigma_max] (generate.py)
    sigma_min = max(0.002, _number(es, "sigma_min", 0.0, where))
    sigma_max = min(80.0, _number(es, "sigma_max", math.inf, where))
    tensors: dict[str, Tensor] = {}
    _flat_tensors(model, "", tensors, where)
    own = backbone.state_dict()
    problems = [f"tensor {k!r} is missing" for k in own if k not in tensors]
    problems += [f"tensor {k!r} is not part of EDM's SongUNet" for k in tensors if k not in own]
    problems += [f"tensor {k!r} has shape {list(tensors[k].shape)} but the network expects {list(v.shape)}"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise EDMImportError(f"{where}: the weights do not fit the SongUNet its init_kwargs describe: "
                             f"{'; '.join(problems[:5])}{more}")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise EDMImportError(f"{where}: tensors {bad[:5]} hold NaN or inf; the snapshot is damaged or its run diverged")
    _check_layers(model, backbone, "", where)  # after the tensors: a shape mismatch is the clearer message
    backbone.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()})
    info = {"num_classes": backbone.label_dim, "sigma_min": sigma_min, "sigma_max": sigma_max,
            "edm": {"precond": ema.class_name, "model": model.class_name, "use_fp16": bool(es.get("use_fp16", False)),
                    "dataset_kwargs": _json_plain(snapshot.get("dataset_kwargs"))}}
    return Precond(backbone, sigma_data).eval(), info


def _json_plain(value: Any) -> Any:
    """A JSON-able copy of plain data (dicts, lists, numbers, strings); anything else becomes None."""
    if isinstance(value, dict):
        return {str(k): _json_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value is None or isinstance(value, bool | int | float | str) else None


def _fingerprint(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"edm_pickle": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def convert_edm_pickle(pkl_path: str | Path, out_folder: str | Path) -> Path:
    """Read an EDM snapshot once (safely), build our network with its EMA weights and write a teacher folder
    (``model.safetensors`` + ``teacher.json`` with arch kind ``edm_songunet``) that ``net:<folder>`` loads."""
    pkl = Path(pkl_path).expanduser()
    net, info = network_from_snapshot(read_edm_pickle(pkl), pkl)
    return save_teacher(out_folder, net, {**info, "source": _fingerprint(pkl)})


def converted_folder(pkl_path: str | Path) -> Path:
    """Where ``edm:<file.pkl>`` keeps its conversion: ``<file>.teacher`` beside the pickle."""
    pkl = Path(pkl_path).expanduser()
    return pkl.with_name(pkl.stem + ".teacher")


def load_edm_teacher(pkl_path: str | Path) -> NetworkTeacher:
    """The teacher of an EDM snapshot (spec ``edm:<file.pkl>``): converted into ``converted_folder`` on first
    use, and again only when the pickle's contents change; later uses read the safetensors folder."""
    pkl = Path(pkl_path).expanduser()
    if not pkl.is_file():
        raise FileNotFoundError(f"EDM pickle {str(pkl)!r} does not exist; check the path")
    folder = converted_folder(pkl)
    if folder.exists():
        source = _recorded_source(folder)
        if source is None:
            raise EDMImportError(f"{folder} exists but is not a conversion of an EDM pickle; move it away, or "
                                 "convert into another folder with dibregman.teachers.edm.convert_edm_pickle and "
                                 "use net:<that folder>")
        if source == _fingerprint(pkl) and (folder / WEIGHTS_FILE).is_file():
            return load_folder(folder)
    convert_edm_pickle(pkl, folder)
    return load_folder(folder)


def _recorded_source(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    source = doc.get("source") if isinstance(doc, dict) else None
    return source if isinstance(source, dict) and "edm_pickle" in source else None
