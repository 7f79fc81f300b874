"""Export a U-Net one-step generator as a diffusers pipeline folder that loads without dibregman.

The folder holds the student's ``UNet2DModel`` (``unet/``; a text student's ``UNet2DConditionModel`` with its
``tokenizer/`` and ``text_encoder/``), ``model_index.json`` naming the custom pipeline
class, that class's source (``dibregman_pipeline.py``, a copy of ``dibregman/pipeline.py``), the original
``generator.json`` (provenance) and a README. Load it with diffusers alone::

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

``trust_remote_code`` is diffusers' consent to run the pipeline file inside the folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import pipeline as pipeline_module
from .artifacts import load_generator
from .io import writing
from .nets.text_unet import TextUNet
from .nets.unet import NOISE_SCALE, UNet

MODULE = "dibregman_pipeline"  # a distinctive file name: diffusers caches local pipeline files by name
CLASS = "DibregmanOneStepPipeline"
TEXT_CLASS = "DibregmanTextOneStepPipeline"

_README = """# Generator distilled with dibregman

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{name}", trust_remote_code=True)
images = pipe({usage}, generator=torch.Generator().manual_seed(0)).images
```

{steps}, with EDM preconditioning (sigma_data = {sigma_data}); images are returned in [0, 1].
`output_type` is "pil" (default), "np" or "pt"; `latents` supplies the noise z yourself.
"""


def _steps_text(sigmas: tuple[float, ...]) -> str:
    if len(sigmas) == 1:
        return f"One U-Net evaluation per image: `x = D(sigma_g z, sigma_g)` (sigma_g = {sigmas[0]:g})"
    return (f"{len(sigmas)} U-Net evaluations per image at the noise levels {', '.join(f'{s:.4g}' for s in sigmas)}: "
            "`x_1 = D(sigma_1 z_1, sigma_1)`, then `x_k = D(x_(k-1) + sigma_k z_k, sigma_k)` (`latents` of shape "
            f"[batch, {len(sigmas)}, C, H, W])")


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") in (
            [MODULE, CLASS], [MODULE, TEXT_CLASS])
    except (OSError, ValueError, AttributeError):
        return False


def export_diffusers(generator_folder: str | Path, out_folder: str | Path) -> Path:
    """Write ``out_folder`` from a generator saved by ``save_generator`` (or a run folder holding ``generator/``).

    Only U-Net generators export (diffusers has no MLP model). An existing ``out_folder`` is replaced only
    when it is empty or an earlier export; the new folder is built beside it and swapped in once complete.
    """
    gen, info = load_generator(generator_folder)
    backbone = gen.denoiser.backbone
    if not isinstance(backbone, UNet | TextUNet):
        kind = info.get("arch", {}).get("kind", "mlp")
        why = (" (a student of a diffusers teacher keeps that teacher's timestep and prediction conventions, which "
               "the exported EDM pipeline does not implement)") if kind == "diffusers" else ""
        raise ValueError(f"{generator_folder} holds a generator with a {kind!r} backbone; only U-Net (kinds 'unet', "
                         f"'text_unet') generators export to diffusers{why}")
    out = Path(out_folder)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_export(out))):
        raise FileExistsError(f"{out} exists and is not an earlier export; choose a new folder or remove it")
    conventions = {"sigma_data": gen.denoiser.sigma_data, "sigma_g": gen.sigma_g, "noise_scale": NOISE_SCALE,
                   "sigmas": list(gen.sigmas)}
    if isinstance(backbone, TextUNet):
        from .text import load_text_encoder

        encoder = load_text_encoder(info["text"]["encoder"], info["text"].get("length"))
        cls = pipeline_module.DibregmanTextOneStepPipeline
        pipe = cls(unet=backbone.unet, tokenizer=encoder.tokenizer, text_encoder=encoder.model,
                   max_length=encoder.max_length, **conventions)
        usage = 'prompt=["a photo of an ankle boot", "someone\'s bag"]'
    else:
        cls = pipeline_module.DibregmanOneStepPipeline
        pipe = cls(unet=backbone.unet, **conventions)
        usage = f"batch_size=4, class_labels={'0' if backbone.num_classes else 'None'}"
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # mkdir, not mkdtemp: usual (not 0700) permissions
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export of this pid
        tmp.mkdir()
        try:
            pipe.save_pretrained(tmp)
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text())
            index["_class_name"] = [MODULE, cls.__name__]  # diffusers: "the class is in <MODULE>.py here"
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(pipeline_module.__file__, tmp / f"{MODULE}.py")
            (tmp / "generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            readme = _README.format(name=out.name, usage=usage, sigma_data=gen.denoiser.sigma_data,
                                    steps=_steps_text(gen.sigmas))
            (tmp / "README.md").write_text(readme)
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an earlier ``out`` is renamed aside first and put back if that fails, so
    at every moment one complete export is there (only a crash between the two renames leaves it under
    ``.<name>.old-<pid>`` beside the new name, never half of one)."""
    if not out.exists():
        tmp.rename(out)
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out, aside)
    try:
        tmp.rename(out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
