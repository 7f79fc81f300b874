"""Train, save and load the image classifier behind Frechet distance, KID, precision/recall and label
adherence (the network: ``nets/classifier.py``).

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

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..assets import shipped, shipped_names
from ..data.images import ImageSet, load_images, test_split
from ..dist import resolve_device
from ..io import atomic_save_safetensors, read_tagged_json, require_files, write_json
from ..nets.classifier import Classifier

Tensor = torch.Tensor

FORMAT = "dibregman-classifier"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"


# --- training --------------------------------------------------------------------------------------------


def shift_images(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by its own random offset in ``[-max_shift, max_shift]`` pixels per axis,
    filling the uncovered border with the nearest edge pixel (the background, for centred objects)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    oy, ox = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


@torch.no_grad()
def predict_logits(model: Classifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits ``[N, num_classes]`` on the CPU, computed in batches on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(images[i:i + batch_size].to(device, torch.float32)).cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.num_classes)


def accuracy(model: Classifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    return float((predict_logits(model, images, batch_size).argmax(1) == labels.cpu()).double().mean())


def train_classifier(data: str | ImageSet, out: str | Path, epochs: int = 8, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, device: str = "cpu", *, width: int = 16, depth: int = 2,
                     feature_dim: int = 128, max_shift: int = 0, test: str | ImageSet | None = None,
                     command: str | None = None, progress: bool = True) -> Path:
    """Train a Classifier on labelled images and save it as a folder ``out``; returns ``out``.

    ``data``: an image spec (``fashion-mnist``) or an ``ImageSet``. Adam, cross-entropy, learning rate
    decayed to zero along a cosine over all steps; ``max_shift > 0`` adds random translations. ``test``
    (a spec or ``ImageSet``) is scored at the end only, never used for choices; by default it is the
    matching test split of a spec (``data.images.test_split``) where the source has one, else none is
    recorded. Data and test set load before training starts, so a missing file fails at once.
    One CPU generator seeded from ``seed`` draws weights, batch order and shifts, so a run is a function
    of its arguments on a given device. ``command`` (how it was launched) is recorded in the folder."""
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                               ("width", width, 1), ("depth", depth, 1), ("feature_dim", feature_dim, 1),
                               ("max_shift", max_shift, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be a {kind} integer; got {value!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    dev = resolve_device(device)
    train_set = load_images(data) if isinstance(data, str) else data
    if train_set.labels is None or train_set.num_classes < 2:
        raise ValueError(f"{train_set.name} has no labels (or fewer than 2 classes): a classifier needs "
                         "labelled images")
    test_set, test_name = _test_set(data, test)
    c, h, w = train_set.shape
    if h != w:
        raise ValueError(f"{train_set.name} has {h}x{w} images; the classifier takes square images")
    if test_set is not None and (test_set.shape != train_set.shape or test_set.labels is None):
        raise ValueError(f"test set {test_name} must hold labelled images of shape {list(train_set.shape)} like "
                         f"{train_set.name}; got {list(test_set.shape)}"
                         f"{'' if test_set.labels is not None else ' without labels'}")

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # layers initialise from the global RNG: seed it from ours
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        model = Classifier(c, h, train_set.num_classes, width, feature_dim, depth)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    images, labels = train_set.images, train_set.labels
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))

    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = shift_images(images[idx], max_shift, gen).to(dev)
            y = labels[idx].to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / len(images):.4f}, train accuracy "
                  f"{correct / len(images):.4f}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    # wall time depends on what else the machine runs; CPU time (all threads) measures the work itself
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    test_acc = None
    if test_set is not None:
        test_acc = accuracy(model, test_set.images, test_set.labels)
        if progress:
            print(f"test accuracy on {test_name}: {test_acc:.4f}", file=sys.stderr)
    config = {"epochs": epochs, "batch_size": batch_size, "lr": float(lr), "seed": seed, "device": str(dev),
              "max_shift": max_shift, "optimizer": "adam", "schedule": "cosine", "train_images": len(images)}
    info = {"data": train_set.name if not isinstance(data, str) else data, "class_names": list(train_set.class_names),
            "test_accuracy": test_acc, "test_data": test_name, "command": command, "train_config": config,
            "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1)}
    return save_classifier(out, model, info)


def _test_set(data: str | ImageSet, test: str | ImageSet | None) -> tuple[ImageSet | None, str | None]:
    if isinstance(test, ImageSet):
        return test, test.name
    if test is not None:
        return load_images(test), test
    spec = test_split(data) if isinstance(data, str) else None
    return (load_images(spec), spec) if spec is not None else (None, None)


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
    from .checkpoint import INTEGRITY, MANIFEST, write_manifest

    doc = {**info, "format": FORMAT, "version": VERSION, "arch": model.arch(), INTEGRITY: MANIFEST}
    atomic_save_safetensors(folder / WEIGHTS_FILE, model.state_dict(), metadata={"format": FORMAT})
    write_json(folder / META_FILE, doc)
    write_manifest(folder, [WEIGHTS_FILE, META_FILE])  # last: checksums, verified by load_module
    return folder


def load_classifier(folder: str | Path, device: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Read a folder written by ``save_classifier``: ``(model in eval mode, frozen, info)``."""
    from .checkpoint import CheckpointError, load_module

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
