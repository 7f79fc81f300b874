"""Train the image classifier behind Frechet distance, KID, precision/recall and label adherence (the
network: ``nets/classifier.py``; its folder format, loading and feature interface: ``metrics/classifier.py``,
whose names are importable from here too)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.images import ImageSet, load_images, test_split
from ..dist import resolve_device
from ..metrics.classifier import (  # noqa: F401  (re-exported: the classifier's public names)
    FORMAT,
    META_FILE,
    VERSION,
    WEIGHTS_FILE,
    ClassifierFeatures,
    load_classifier,
    save_classifier,
    shipped_classifier,
)
from ..nets.classifier import Classifier

Tensor = torch.Tensor



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
