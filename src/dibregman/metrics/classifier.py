"""The image classifier's folder, written by ``train/classifier.py`` and loaded here as the feature network of
Frechet distance, KID, precision/recall and label adherence.

Folder format (version 1)::

    model.safetensors   the Classifier's state dict, float32
    classifier.json     {"format": "dibregman-classifier", "version": 1,
                         "arch": {"kind": "classifier", <constructor arguments>},
                         "data": str, "class_names": [str, ...], "test_accuracy": float | null,
                         "test_data": str | null, "command": str | null, "train_config": {...},
                         "train_seconds": float, "train_cpu_seconds": float}

The Fashion-MNIST classifier ships inside the package (``shipped_classifier("fashion-mnist")``), so every
evaluation uses the same features without a download. Weights are read only through safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..assets import shipped, shipped_names
from ..dist import resolve_device
from ..io import atomic_save_safetensors, read_tagged_json, require_files, write_json
from ..nets.classifier import Classifier

Tensor = torch.Tensor

FORMAT = "dibregman-classifier"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"


# --- saving and loading ----------------------------------------------------------------------------------


def save_classifier(folder: str | Path, model: Classifier, info: dict[str, Any]) -> Path:
    """Write ``model`` and ``info`` (``data``, ``class_names``, ``test_accuracy``, ...) as a classifier
    folder. Weights first, each file atomic, so ``classifier.json`` only describes complete weights."""
    folder = Path(folder)
    reserved = {"format", "version", "arch"} & info.keys()
    if reserved:
        raise ValueError(f"info must not set {sorted(reserved)}: save_classifier derives them from the model")
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) != model.num_classes:
        raise ValueError(f"info['class_names'] must list {model.num_classes} names; got {names!r}")
    from ..integrity import INTEGRITY, MANIFEST, write_manifest

    doc = {**info, "format": FORMAT, "version": VERSION, "arch": model.arch(), INTEGRITY: MANIFEST}
    atomic_save_safetensors(folder / WEIGHTS_FILE, model.state_dict(), metadata={"format": FORMAT})
    write_json(folder / META_FILE, doc)
    write_manifest(folder, [WEIGHTS_FILE, META_FILE])  # last: checksums, verified by load_module
    return folder


def load_classifier(folder: str | Path, device: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Read a folder written by ``save_classifier``: ``(model in eval mode, frozen, info)``."""
    from ..integrity import CheckpointError, load_module

    folder = require_files(folder, "classifier", (META_FILE, WEIGHTS_FILE), "train one with train_classifier")
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    fix = "re-create the classifier folder with train_classifier"
    info = read_tagged_json(meta_path, FORMAT, fix)
    if info.get("integrity") is not None and not (folder / "manifest.json").is_file():
        raise ValueError(f"{folder / 'manifest.json'} is missing ({META_FILE} says it has one); {fix}")
    if info.get("version") != VERSION:
        raise ValueError(f"{str(meta_path)!r} has classifier format version {info.get('version')!r}; this dibregman "
                         f"reads version {VERSION}: upgrade dibregman or {fix}")
    try:
        model = Classifier.from_arch(info.get("arch"))
    except ValueError as e:
        raise ValueError(f"{str(meta_path)!r}: {e}") from None
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) != model.num_classes or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{str(meta_path)!r}: class_names must list {model.num_classes} strings; got {names!r}")
    try:
        load_module(model, weights_path, hint=f"the arch in {META_FILE} describes another network; {fix}")
    except CheckpointError as e:  # a classifier folder is user input: a ValueError, like its other problems
        raise ValueError(f"{e}; {fix}") from None
    model.requires_grad_(False)
    return model.to(resolve_device(device)).eval(), info


def shipped_classifier(dataset: str) -> Path | None:
    """The classifier folder packaged with dibregman for ``dataset`` (any split of it), or None."""
    folder = shipped(dataset.partition(":")[0], "classifier")
    if folder is None or not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        return None
    return folder


# --- the feature-network interface ------------------------------------------------------------------------


class ClassifierFeatures:
    """A feature network for FD/KID/precision-recall: ``features(images [N, C, H, W] in [-1, 1]) ->
    float64 [N, feature_dim]``, batched, without autograd; ``predict`` gives class labels for label
    adherence. ``name`` tags the metrics it produces (distances from different networks do not compare)."""

    def __init__(self, model: Classifier, name: str = "classifier", batch_size: int = 1000,
                 info: dict[str, Any] | None = None):
        self.model = model.eval()
        self.name = name
        self.batch_size = batch_size
        self.info: dict[str, Any] = dict(info or {})
        self.dim = model.feature_dim

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", batch_size: int = 1000) -> ClassifierFeatures:
        model, info = load_classifier(folder, device)
        data = str(info.get("data", "")).partition(":")[0] or "custom"
        return cls(model, f"classifier-{data}", batch_size, info)

    @classmethod
    def shipped(cls, dataset: str, device: str = "cpu", batch_size: int = 1000) -> ClassifierFeatures:
        folder = shipped_classifier(dataset)
        if folder is None:
            names = ", ".join(shipped_names("classifier")) or "none: an install without package data?"
            raise FileNotFoundError(f"no classifier ships for {dataset!r} (shipped: {names}); train one with "
                                    "train_classifier and load it with ClassifierFeatures.load")
        return cls.load(folder, device, batch_size)

    @torch.no_grad()
    def _batched(self, images: Tensor, fn: Any) -> Tensor:
        device = next(self.model.parameters()).device
        out = [fn(images[i:i + self.batch_size].to(device, torch.float32)).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def __call__(self, images: Tensor) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim))
        return self._batched(images, self.model.features).double().numpy()

    def logits(self, images: Tensor) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.model.num_classes))
        return self._batched(images, self.model).double().numpy()

    def predict(self, images: Tensor) -> np.ndarray:
        """Predicted class labels ``[N]`` (int64)."""
        return self.logits(images).argmax(1).astype(np.int64)
