"""``export_diffusers``: the exported folder loads with diffusers alone and samples exactly what the generator does."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from dibregman.artifacts import save_generator
from dibregman.export import export_diffusers
from dibregman.generator import OneStepGenerator
from dibregman.nets.mlp import MLP
from dibregman.nets.unet import NOISE_SCALE, UNet
from dibregman.precond import Precond

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline_module_cache(tmp_path, monkeypatch):
    """diffusers copies a folder's pipeline file into its modules cache: keep that in tmp_path, not ~/.cache."""
    import diffusers.utils.dynamic_modules_utils as dyn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # diffusers appends its cache folder to sys.path


def tiny_generator(num_classes: int) -> OneStepGenerator:
    torch.manual_seed(0)
    unet = UNet(channels=1, resolution=8, base=8, mult=(1, 2), norm_groups=4, num_classes=num_classes)
    gen = OneStepGenerator(Precond(unet, 0.5), 2.5)
    with torch.no_grad():  # move off diffusers' initialisation so only the saved weights can reproduce it
        for p in gen.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return gen.eval()


def export_and_load(tmp_path, gen: OneStepGenerator):
    from diffusers import DiffusionPipeline

    save_generator(tmp_path / "gen", gen, {"shape": [1, 8, 8]})
    out = export_diffusers(tmp_path / "gen", tmp_path / "export")
    return out, DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)


def test_export_samples_equal_generator(tmp_path):
    gen = tiny_generator(num_classes=3)
    out, pipe = export_and_load(tmp_path, gen)
    assert type(pipe).__name__ == "DibregmanOneStepPipeline"
    assert (pipe.config.sigma_data, pipe.config.sigma_g, pipe.config.noise_scale) == (0.5, 2.5, NOISE_SCALE)
    assert json.loads((out / "generator.json").read_text())["arch"]["kind"] == "unet"

    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        ref_cond, ref_uncond = (gen(z, cond) + 1) / 2, (gen(z) + 1) / 2
    assert min(ref_cond.min(), ref_uncond.min()) > 0 and max(ref_cond.max(), ref_uncond.max()) < 1  # no clamping
    assert (ref_cond - ref_uncond).abs().max() > 1e-3  # the labels matter, so the check below covers them

    # noise drawn by the pipeline from a seeded torch.Generator is the same z
    got = pipe(batch_size=4, class_labels=cond, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(got, ref_cond, atol=1e-5, rtol=0)
    got = pipe(batch_size=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert got.shape == (4, 8, 8, 1) and got.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(got).permute(0, 3, 1, 2), ref_uncond, atol=1e-5, rtol=0)
    got = pipe(latents=z[:2], class_labels=2, output_type="pt").images  # a scalar label covers the batch
    torch.testing.assert_close(got, (gen(z[:2], torch.tensor([2, 2])).detach() + 1) / 2, atol=1e-5, rtol=0)

    images = pipe(class_labels=[0, 2]).images  # one image per label
    assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "L"
    with pytest.raises(ValueError, match="class labels must lie"):
        pipe(class_labels=5)


def test_export_unconditional(tmp_path):
    gen = tiny_generator(num_classes=0)
    _, pipe = export_and_load(tmp_path, gen)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    got = pipe(batch_size=3, generator=torch.Generator().manual_seed(2), output_type="pt").images
    torch.testing.assert_close(got, ((gen(z).detach() + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=0)


def test_export_refuses_mlp_and_foreign_folders(tmp_path):
    mlp = OneStepGenerator(Precond(MLP(dim=2, hidden=16, depth=2), 0.5), 2.5)
    save_generator(tmp_path / "mlp", mlp, {"shape": [2]})
    with pytest.raises(ValueError, match="only U-Net"):
        export_diffusers(tmp_path / "mlp", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    save_generator(tmp_path / "gen", tiny_generator(num_classes=0), {"shape": [1, 8, 8]})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        export_diffusers(tmp_path / "gen", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    export_diffusers(tmp_path / "gen", tmp_path / "again")
    export_diffusers(tmp_path / "gen", tmp_path / "again")  # an earlier export is replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
