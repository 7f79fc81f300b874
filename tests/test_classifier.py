"""The feature/label classifier: network, folder format, training, and the shipped Fashion-MNIST weights."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from dibregman.data.images import FASHION_MNIST_DIR, ImageSet, load_images
from dibregman.nets.classifier import Classifier
from dibregman.train.classifier import (
    META_FILE,
    WEIGHTS_FILE,
    ClassifierFeatures,
    load_classifier,
    save_classifier,
    shift_images,
    shipped_classifier,
    train_classifier,
)
from dibregman.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", "b", "c"]


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(channels=1, resolution=8, num_classes=3, width=4, feature_dim=16, depth=2)


def _saved(tmp_path, seed: int = 0):
    model = _model(seed)
    folder = save_classifier(tmp_path / "clf", model, {"data": "toy", "class_names": NAMES, "test_accuracy": None})
    return model, folder


def _halves(n: int, seed: int) -> ImageSet:
    """Separable toy images: class 0 has a bright left half, class 1 a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, 8, 8), -0.5)
    x[labels == 0, :, :, :4] = 0.5
    x[labels == 1, :, :, 4:] = 0.5
    x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return ImageSet(x, labels, ("left", "right"), f"halves-{seed}")


# --- the network -----------------------------------------------------------------------------------------


def test_shapes_and_arch_round_trip():
    model = _model()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert model.features(x).shape == (5, 16)
    assert model(x).shape == (5, 3)
    rebuilt = Classifier.from_arch(json.loads(json.dumps(model.arch())))
    assert rebuilt.arch() == model.arch()
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 8, 8\]"):
        model(torch.zeros(2, 3, 8, 8))


def test_odd_resolution_and_colour():
    model = Classifier(channels=3, resolution=7, num_classes=2, width=4, feature_dim=8)
    assert model(torch.zeros(2, 3, 7, 7)).shape == (2, 2)


@pytest.mark.parametrize("arch, match", [
    ({"kind": "unet", "channels": 1}, "unknown network kind"),
    ({"kind": "classifier", "channels": 1, "wdith": 4}, r"unknown Classifier arguments \['wdith'\]"),
    ({"kind": "classifier", "num_classes": 1}, "num_classes must be at least 2"),
    ({"kind": "classifier", "width": 0}, "width must be a positive integer"),
    ("classifier", "arch must be a JSON object"),
])
def test_from_arch_rejects_bad_entries(arch, match):
    with pytest.raises(ValueError, match=match):
        Classifier.from_arch(arch)


def test_features_do_not_depend_on_the_batch():
    # GroupNorm, no running statistics: an image's features are the same alone or in any batch
    model = _model().eval()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    together = model.features(x)
    alone = torch.cat([model.features(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    model.train()
    torch.testing.assert_close(model.features(x), together)


# --- folder format -----------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model, folder = _saved(tmp_path)
    loaded, info = load_classifier(folder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert info["format"] == "dibregman-classifier" and info["version"] == 1
    assert info["arch"] == model.arch() and info["class_names"] == NAMES
    x = torch.rand(7, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
        assert torch.equal(loaded.features(x), model.features(x))

    feats = ClassifierFeatures.load(folder, batch_size=3)  # 7 images: three batches, the last partial
    f = feats(x)
    assert f.dtype == np.float64 and f.shape == (7, 16)
    np.testing.assert_allclose(f, model.features(x).detach().double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ClassifierFeatures.load(folder)(x), model.features(x).detach().double().numpy())
    assert feats.name == "classifier-toy"
    labels = feats.predict(x)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, model(x).argmax(1).numpy())
    assert feats(torch.zeros(0, 1, 8, 8)).shape == (0, 16)


def test_save_rejects_wrong_class_names(tmp_path):
    with pytest.raises(ValueError, match="must list 3 names"):
        save_classifier(tmp_path, _model(), {"class_names": ["a"]})
    with pytest.raises(ValueError, match="must not set"):
        save_classifier(tmp_path, _model(), {"class_names": NAMES, "arch": {}})


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(tmp_path / "nope")
    _, folder = _saved(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_FILE}"):
        load_classifier(folder)


def test_corrupted_weights_give_a_clear_error(tmp_path):
    _, folder = _saved(tmp_path)
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated.*re-create"):
        load_classifier(folder)


def test_nan_weights_give_a_clear_error(tmp_path):
    model, folder = _saved(tmp_path)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    save_classifier(folder, model, {"class_names": NAMES})
    with pytest.raises(ValueError, match="NaN or inf"):
        load_classifier(folder)


def test_weights_of_another_arch_give_a_clear_error(tmp_path):
    _, folder = _saved(tmp_path)
    doc = json.loads((folder / META_FILE).read_text())
    doc["arch"]["width"] = 8
    (folder / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="does not match this model"):
        load_classifier(folder)


@pytest.mark.parametrize("text, match", [
    (json.dumps({"format": "dibregman-teacher", "version": 1}), "is not a dibregman-classifier file"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"format": "dibregman-classifier", "version": 2}), "format version 2"),
    (json.dumps({"format": "dibregman-classifier", "version": 1, "arch": {"kind": "mlp"}}), "unknown network kind"),
])
def test_wrong_metadata_gives_a_clear_error(tmp_path, text, match):
    _, folder = _saved(tmp_path)
    (folder / META_FILE).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_classifier(folder)


def test_bad_class_names_in_metadata(tmp_path):
    _, folder = _saved(tmp_path)
    doc = json.loads((folder / META_FILE).read_text())
    doc["class_names"] = ["a", "b"]
    (folder / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="class_names must list 3 strings"):
        load_classifier(folder)


# --- training --------------------------------------------------------------------------------------------


def test_shift_images_translates_each_image():
    x = torch.full((50, 1, 8, 8), -1.0)
    x[:, :, 4, 4] = 1.0
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(shift_images(x, 0, gen), x)
    y = shift_images(x, 2, gen)
    assert y.shape == x.shape
    bright = (y == 1.0).nonzero()[:, 2:]  # one bright pixel per image, moved by at most 2
    assert len(bright) == 50 and (bright - 4).abs().max() <= 2
    assert len({tuple(b.tolist()) for b in bright}) > 5  # offsets differ between images


def test_training_on_separable_toy_images(tmp_path):
    train, test = _halves(512, 0), _halves(256, 1)
    kw = {"epochs": 3, "batch_size": 32, "lr": 1e-2, "width": 4, "depth": 1, "feature_dim": 8,
          "test": test, "progress": False}
    out = train_classifier(train, tmp_path / "a", command="pytest", max_shift=1, **kw)
    model, info = load_classifier(out)
    assert info["test_accuracy"] >= 0.95
    assert info["data"] == "halves-0" and info["test_data"] == "halves-1" and info["command"] == "pytest"
    assert info["class_names"] == ["left", "right"] and info["train_config"]["epochs"] == 3
    assert (ClassifierFeatures(model).predict(test.images) == test.labels.numpy()).mean() == info["test_accuracy"]
    # a run is a function of its arguments
    again, _ = load_classifier(train_classifier(train, tmp_path / "b", max_shift=1, **kw))
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


KW = {"epochs": 2, "batch_size": 32, "lr": 1e-2, "width": 4, "depth": 1, "feature_dim": 8, "max_shift": 1,
      "progress": False}


def _weights(folder):
    return load_classifier(folder)[0].state_dict()


def test_an_interrupted_training_resumes_bit_exactly(tmp_path, monkeypatch):
    import dibregman.train.classifier as clf_mod
    from dibregman.train.guard import Interrupted

    train = _halves(200, 0)  # 7 steps per epoch, 14 in all
    whole = train_classifier(train, tmp_path / "whole", **KW)
    real, calls = clf_mod.shift_images, []

    def sigterm_in_step_9(*args):
        calls.append(1)
        if len(calls) == 9:  # mid-epoch: the order of the epoch must come back from the checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(clf_mod, "shift_images", sigterm_in_step_9)
    with pytest.raises(Interrupted, match="SIGTERM at step 9"):
        train_classifier(train, tmp_path / "cut", **KW)
    monkeypatch.undo()
    assert not (tmp_path / "cut" / META_FILE).exists() and (tmp_path / "cut" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train_classifier(train, tmp_path / "cut", **KW)
    with pytest.raises(ConfigError, match="started with other arguments"):
        train_classifier(train, tmp_path / "cut", resume=True, **{**KW, "lr": 2e-2})
    out = train_classifier(train, tmp_path / "cut", resume=True, **KW)
    a, b = _weights(whole), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoints").exists()  # a finished folder is the classifier alone
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 14] and rows[-1]["acc/train"] > 0.9  # the rows of one run, learning
    with pytest.raises(ConfigError, match="already holds a trained classifier"):
        train_classifier(train, out, resume=True, **KW)


def test_a_diverging_training_stops_with_a_clear_error(tmp_path):
    from dibregman.train.guard import NonFiniteError

    with pytest.raises(NonFiniteError, match="non-finite classifier"):
        train_classifier(_halves(64, 0), tmp_path / "nan", **{**KW, "lr": 1e30})
    assert not (tmp_path / "nan" / META_FILE).exists()
    with pytest.raises(ValueError, match="lr must be a positive number below"):
        train_classifier(_halves(64, 0), tmp_path / "big", **{**KW, "lr": 1e39})
    broken = _halves(64, 0)
    broken.images[5, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="halves-0 has non-finite pixels"):
        train_classifier(broken, tmp_path / "broken", **KW)
    assert not (tmp_path / "big").exists() and not (tmp_path / "broken").exists()  # refused before the folder


def test_training_needs_labels(tmp_path):
    data = ImageSet(torch.zeros(4, 1, 8, 8), None, (), "unlabelled")
    with pytest.raises(ValueError, match="no labels"):
        train_classifier(data, tmp_path, epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        train_classifier(_halves(8, 0), tmp_path, epochs=0, progress=False)
    with pytest.raises(ValueError, match="max_shift must be a non-negative integer"):
        train_classifier(_halves(8, 0), tmp_path, max_shift=-1, progress=False)
    wrong = ImageSet(torch.zeros(4, 1, 6, 6), torch.zeros(4, dtype=torch.long), ("left", "right"), "small")
    with pytest.raises(ValueError, match=r"test set small must hold labelled images of shape \[1, 8, 8\]"):
        train_classifier(_halves(8, 0), tmp_path, test=wrong, progress=False)


# --- the shipped Fashion-MNIST classifier ------------------------------------------------------------------


def test_shipped_classifier_loads():
    folder = shipped_classifier("fashion-mnist")
    assert folder is not None and shipped_classifier("fashion-mnist:test") == folder
    assert shipped_classifier("cifar10") is None
    assert (folder / WEIGHTS_FILE).stat().st_size < 1_000_000
    model, info = load_classifier(folder)
    assert info["data"] == "fashion-mnist" and len(info["class_names"]) == 10
    assert model.arch()["resolution"] == 28 and info["test_accuracy"] >= 0.9
    assert (folder / "README.md").is_file()
    with pytest.raises(FileNotFoundError, match="no classifier ships for 'cifar10'"):
        ClassifierFeatures.shipped("cifar10")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_shipped_classifier_accuracy_on_fashion_mnist_test():
    test = load_images("fashion-mnist:test")
    feats = ClassifierFeatures.shipped("fashion-mnist")
    images, labels = test.images[:1000], test.labels[:1000].numpy()
    assert (feats.predict(images) == labels).mean() >= 0.85
    assert feats(images[:10]).shape == (10, feats.dim)


def test_training_from_a_spec_without_a_test_split(tmp_path):
    pytest.importorskip("sklearn", reason="the digits source needs scikit-learn (pip install 'dibregman[data]')")
    out = train_classifier("digits", tmp_path / "d", epochs=1, width=4, depth=1, feature_dim=8, progress=False)
    _, info = load_classifier(out)
    assert info["data"] == "digits" and info["test_accuracy"] is None and info["test_data"] is None
    assert len(info["class_names"]) == 10
