"""Image metrics during and after distillation: Frechet distance, KID, precision/recall on a feature
network's features, and label adherence (the classifier's accuracy on class-conditional samples).

The feature network is the project's classifier for the teacher's data set (shipped for Fashion-MNIST) or
a classifier folder the user names; with none, a run reports no image numbers (it still trains and writes
its samples and grids). Every result carries its protocol string.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fid import fd_from_features, kid, precision_recall

Tensor = torch.Tensor


class ImageEvaluator:
    """Reference features computed once; ``__call__(samples, labels)`` -> metrics dict."""

    def __init__(self, reference: Tensor, classifier_folder: str | Path, reference_name: str):
        from ..train.classifier import ClassifierFeatures

        self.features = ClassifierFeatures.load(classifier_folder)
        self.ref = self.features(reference)
        self.protocol = (f"classifier features ({self.features.name}); reference: {len(reference)} images of "
                         f"{reference_name}; samples: as many, class-balanced")

    def __call__(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        feats = self.features(samples)
        kid_mean, _ = kid(feats, self.ref, seed=0)
        prec, rec = precision_recall(self.ref, feats)
        out = {"fd": fd_from_features(feats, self.ref), "kid": kid_mean, "precision": prec, "recall": rec}
        if labels is not None:
            pred = self.features.predict(samples)
            out["label_acc"] = float(np.mean(pred == labels.cpu().numpy()))
        return out


def resolve_classifier(spec: str, data_spec: str | None) -> Path | None:
    """``auto``: the shipped classifier of the teacher's data set; ``none``; or a classifier folder."""
    if spec == "none":
        return None
    if spec != "auto":
        return Path(spec)
    from ..train.classifier import shipped_classifier

    return shipped_classifier((data_spec or "").split(":")[0])


def make_evaluator(teacher: Any, reference: Tensor, classifier: str) -> ImageEvaluator | None:
    data_spec = getattr(teacher, "data_spec", None)
    folder = resolve_classifier(classifier, data_spec)
    if folder is None:
        print(f"dibregman: no classifier for data {data_spec!r}: image metrics are skipped (train one with "
              "`dibregman train-classifier` and pass --classifier <folder>)", file=sys.stderr)
        return None
    name = data_spec or "the teacher's samples"
    return ImageEvaluator(reference, folder, f"{name} (held-out split where one exists)")
