"""Train the image classifier behind Frechet distance, KID, precision/recall and label adherence (the
network: ``nets/classifier.py``; its folder format, loading and feature interface: ``metrics/classifier.py``,
whose names are importable from here too)."""

from __future__ import annotations

import math
import shutil
import sys
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
from ..run_folder import RunFolder
from .checkpoint import entry, load_latest, same_arguments, save_checkpoint
from .config import ConfigError
from .driver import RunDriver
from .guard import NonFiniteGuard, holds_run_lock, keeps_caller_rng, prepare_run_dir

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


@holds_run_lock  # until the classifier is written: a second process cannot start on the folder before
@keeps_caller_rng
def train_classifier(data: str | ImageSet, out: str | Path, epochs: int = 8, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, device: str = "cpu", *, width: int = 16, depth: int = 2,
                     feature_dim: int = 128, max_shift: int = 0, test: str | ImageSet | None = None,
                     command: str | None = None, progress: bool | None = None, resume: bool = False,
                     checkpoint_every: int = 500) -> Path:
    """Train a Classifier on labelled images and save it as a folder ``out``; returns ``out``.

    ``data``: an image spec (``fashion-mnist``) or an ``ImageSet``. Adam, cross-entropy, learning rate
    decayed to zero along a cosine over all steps; ``max_shift > 0`` adds random translations. ``test``
    (a spec or ``ImageSet``) is scored at the end only, never used for choices; by default it is the
    matching test split of a spec (``data.images.test_split``) where the source has one, else none is
    recorded. Data and test set load before the folder is made, so a missing file fails at once.
    One CPU generator seeded from ``seed`` draws weights, batch order and shifts, so a run is a function
    of its arguments on a given device. ``command`` (how it was launched) is recorded in the folder.

    While it trains, ``out`` is a run folder like distillation's (``config.json``, ``stats.jsonl`` with
    ``loss/classifier`` and ``acc/train``, ``checkpoints/`` every ``checkpoint_every`` steps and on
    SIGINT/SIGTERM); ``resume=True`` continues an interrupted run bit-exactly (same arguments). A non-finite
    loss or gradient stops it with the last checkpoint named. When it ends, the classifier files are written
    and the checkpoints removed: a finished folder holds the classifier only."""
    _check_arguments(epochs=epochs, batch_size=batch_size, seed=seed, width=width, depth=depth,
                     feature_dim=feature_dim, max_shift=max_shift, checkpoint_every=checkpoint_every, lr=lr)
    dev = resolve_device(device)
    train_set = load_images(data) if isinstance(data, str) else data
    test_set, test_name = _test_set(data, test)
    _check_sets(train_set, test_set, test_name)
    if (Path(out) / META_FILE).exists():
        raise ConfigError(f"{out} already holds a trained classifier; choose another --out or remove it")
    config = {"epochs": epochs, "batch_size": batch_size, "lr": float(lr), "seed": seed, "device": str(dev),
              "max_shift": max_shift, "optimizer": "adam", "schedule": "cosine", "train_images": len(train_set.images),
              "width": width, "depth": depth, "feature_dim": feature_dim}
    out, model, seconds = _train(train_set, Path(out), config, dev, progress, resume, checkpoint_every)
    test_acc = None
    if test_set is not None:
        test_acc = accuracy(model, test_set.images, test_set.labels)
        if progress is not False:
            print(f"test accuracy on {test_name}: {test_acc:.4f}", file=sys.stderr)
    info = {"data": train_set.name if not isinstance(data, str) else data, "class_names": list(train_set.class_names),
            "test_accuracy": test_acc, "test_data": test_name, "command": command, "train_config": config,
            "train_seconds": seconds}
    save_classifier(out, model, info)
    shutil.rmtree(out / RunFolder.CHECKPOINTS)  # a finished folder is the classifier alone
    return out


def _train(train_set: ImageSet, out: Path, config: dict, dev: torch.device, progress: bool | None, resume: bool,
           checkpoint_every: int) -> tuple[Path, Classifier, float]:
    """The training steps, through the run driver: the run folder, the trained model, the seconds of this
    invocation's steps."""
    gen = torch.Generator().manual_seed(config["seed"])
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # layers initialise from the global RNG
    c, h, _ = train_set.shape
    model = Classifier(c, h, train_set.num_classes, config["width"], config["feature_dim"], config["depth"])
    model.to(dev).train()
    out = prepare_run_dir(out, resume)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    images, labels = train_set.images, train_set.labels
    batch_size, max_shift = config["batch_size"], config["max_shift"]
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = config["epochs"] * steps_per_epoch
    guard = NonFiniteGuard("strict", resume_hint=None)
    run = {"step": 0, "order": torch.empty(0, dtype=torch.long)}

    def restore(state: dict, meta: dict) -> None:
        opt.load_state_dict(entry(state, "optimizer", dict, "state.pt"))
        gen.set_state(entry(state, "rng", torch.Tensor, "state.pt"))
        run["order"], run["step"] = entry(state, "order", torch.Tensor, "state.pt"), meta["step"]

    loaded = (load_latest(out / RunFolder.CHECKPOINTS, {"classifier": model}, same_arguments(config, out), restore)
              if resume else None)
    driver = RunDriver(out, total, max(1, min(50, steps_per_epoch)), checkpoint_every, desc="classifier",
                       progress=progress)
    driver.begin(run["step"], config, resume, loaded[0] if loaded is not None else None)

    def update(step: int) -> None:
        i = step % steps_per_epoch
        if i == 0:  # a new epoch: a new order
            run["order"] = torch.randperm(len(images), generator=gen)
        idx = run["order"][i * batch_size:(i + 1) * batch_size]
        x = shift_images(images[idx], max_shift, gen).to(dev)
        y = labels[idx].to(dev)
        for group in opt.param_groups:  # the cosine decay, from the step alone (exact resume)
            group["lr"] = config["lr"] * (0.5 * (1 + math.cos(math.pi * step / total)))
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        guard.step(opt, loss, model, "classifier", step + 1, 0.0, out)
        driver.stats.add({"loss/classifier": loss.detach(), "acc/train": (logits.argmax(1) == y).float().mean()})

    def save(step: int) -> None:
        save_checkpoint(out / RunFolder.CHECKPOINTS, step, {"classifier": model},
                        {"optimizer": opt.state_dict(), "rng": gen.get_state(), "order": run["order"]},
                        {"config": config}, keep=1)

    driver.run(run["step"], update, save,
               after=lambda _, row: {"loss": row["loss/classifier"], "acc": row["acc/train"]} if row else None)
    return out, model, round(sum(driver.step_times), 1)


def _check_arguments(lr: float, **sizes: int) -> None:
    for name, value in sizes.items():
        least = 0 if name in ("seed", "max_shift") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be a {kind} integer; got {value!r}")
    if not (isinstance(lr, int | float) and 0 < lr < 3.4e38):  # float32 parameters take no larger step
        raise ValueError(f"lr must be a positive number below 3.4e38; got {lr!r}")


def _check_sets(train_set: ImageSet, test_set: ImageSet | None, test_name: str | None) -> None:
    if train_set.labels is None or train_set.num_classes < 2:
        raise ValueError(f"{train_set.name} has no labels (or fewer than 2 classes): a classifier needs "
                         "labelled images")
    if not bool(torch.isfinite(train_set.images).all()):
        raise ValueError(f"{train_set.name} has non-finite pixels (NaN or inf): fix or drop those images")
    _, h, w = train_set.shape
    if h != w:
        raise ValueError(f"{train_set.name} has {h}x{w} images; the classifier takes square images")
    if test_set is not None and (test_set.shape != train_set.shape or test_set.labels is None):
        raise ValueError(f"test set {test_name} must hold labelled images of shape {list(train_set.shape)} like "
                         f"{train_set.name}; got {list(test_set.shape)}"
                         f"{'' if test_set.labels is not None else ' without labels'}")


def _test_set(data: str | ImageSet, test: str | ImageSet | None) -> tuple[ImageSet | None, str | None]:
    if isinstance(test, ImageSet):
        return test, test.name
    if test is not None:
        return load_images(test), test
    spec = test_split(data) if isinstance(data, str) else None
    return (load_images(spec), spec) if spec is not None else (None, None)
