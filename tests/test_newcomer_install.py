"""Install and data: Fashion-MNIST is found through DIBREGMAN_FASHION_MNIST as well as at the Debian
package's path; the README tells a newcomer how to reach the installed command."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from dibregman.data.images import FASHION_MNIST_ENV, load_images

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_fashion_mnist_from_the_environment_variable(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    train, test = load_images("fashion-mnist"), load_images("fashion-mnist:test")
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.labels.tolist()[:3] == [0, 1, 2]
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=FASHION_MNIST_ENV):
        load_images("fashion-mnist")


def test_readme_commands_reach_the_installed_command():
    text = (ROOT / "README.md").read_text()
    # every shell line that runs the command either activates the venv first or calls .venv/bin/
    assert "source .venv/bin/activate" in text
    bare = [ln for ln in text.splitlines() if re.match(r"\s*(\$ )?dibregman ", ln)]
    first_bare = text.find(bare[0]) if bare else len(text)
    assert text.find("source .venv/bin/activate") < first_bare
