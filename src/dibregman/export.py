"""Export a one-step generator as a diffusers pipeline folder that loads without dibregman.

A student of a Stable Diffusion 1.x/2.x, SDXL, PixArt-Sigma, SD3 or Flux pipeline goes back into that family: a
folder of the teacher's pipeline class (the teacher's tokenizers and text encoders, the student's UNet or
transformer, its VAE, a scheduler whose one step is the student's) that
``DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, ...)`` runs with no custom code
(``_family_pipeline``). Students of our own networks export as follows.

The folder holds the student's ``UNet2DModel`` (``unet/``; a text student's ``UNet2DConditionModel`` with its
``tokenizer/`` and ``text_encoder/``), ``model_index.json`` naming the custom pipeline
class, that class's source (``dibregman_pipeline.py``, a copy of ``dibregman/pipeline.py``), the original
``generator.json`` (provenance) and a README. Load it with diffusers alone::

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

``trust_remote_code`` is diffusers' consent to run the pipeline file inside the folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import pipeline as pipeline_module
from .artifacts import load_codec_of, load_generator
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


_FAMILY_README = """# One-step student of {teacher}, distilled with dibregman

A `{cls}` folder of the teacher's own family (no custom code, no `trust_remote_code`):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{name}"{load})
images = pipe(["a photo of a cat"], num_inference_steps=1, guidance_scale={scale_in},{call}
              generator=torch.Generator().manual_seed(0)).images
```

One {model} evaluation per image from {at}, then the VAE's decoding. {guidance}
{noise} gives the same images as `dibregman sample` draws from that noise.
"""


def _is_export(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        if index in ([MODULE, CLASS], [MODULE, TEXT_CLASS]):
            return True
        return json.loads((folder / "generator.json").read_text()).get("format") == "dibregman-generator"
    except (OSError, ValueError, AttributeError):
        return False


def export_diffusers(generator_folder: str | Path, out_folder: str | Path) -> Path:
    """Write ``out_folder`` from a generator saved by ``save_generator`` (or a run folder holding ``generator/``).

    Only U-Net generators export (diffusers has no MLP model). An existing ``out_folder`` is replaced only
    when it is empty or an earlier export; the new folder is built beside it and swapped in once complete.
    """
    _check_out(Path(out_folder))  # before anything is loaded
    gen, info = load_generator(generator_folder)
    backbone = gen.denoiser.backbone
    if info.get("latent"):  # a student of a latent pipeline: back into that pipeline class
        pipe, call = _family_pipeline(gen, info, generator_folder)
        readme = _FAMILY_README.format(teacher=info.get("teacher"), cls=type(pipe).__name__,
                                       name=Path(out_folder).name, **call)
        return _write(pipe, out_folder, info, readme)
    if not isinstance(backbone, UNet | TextUNet):
        kind = info.get("arch", {}).get("kind", "mlp")
        why = (" (a student of a diffusers teacher keeps that teacher's timestep and prediction conventions, which "
               "the exported EDM pipeline does not implement)") if kind == "diffusers" else ""
        raise ValueError(f"{generator_folder} holds a generator with a {kind!r} backbone; only U-Net (kinds 'unet', "
                         f"'text_unet') generators export to diffusers{why}")
    out = Path(out_folder)
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
    readme = _README.format(name=out.name, usage=usage, sigma_data=gen.denoiser.sigma_data,
                            steps=_steps_text(gen.sigmas))
    return _write(pipe, out, info, readme, custom=cls.__name__)


def _write(pipe: Any, out_folder: str | Path, info: dict[str, Any], readme: str, custom: str | None = None) -> Path:
    """``pipe.save_pretrained`` into a folder beside ``out_folder``, with ``generator.json`` (provenance), the
    README and, for a ``custom`` pipeline class, its source file; swapped in once complete."""
    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if custom is not None:
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text())
            index["_class_name"] = [MODULE, custom]  # diffusers: "the class is in <MODULE>.py here"
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(pipeline_module.__file__, tmp / f"{MODULE}.py")

    return _written(out_folder, fill, info, readme)


def _written(out_folder: str | Path, fill: Callable[[Path], None], info: dict[str, Any], readme: str) -> Path:
    """``fill(tmp)`` into a folder beside ``out_folder``, then ``generator.json`` (provenance) and the README;
    swapped in once complete."""
    out = Path(out_folder)
    _check_out(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # mkdir, not mkdtemp: usual (not 0700) permissions
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export of this pid
        tmp.mkdir()
        try:
            fill(tmp)
            (tmp / "generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            (tmp / "README.md").write_text(readme)
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


_LORA_README = """# LoRA of a one-step student of {teacher}, distilled with dibregman

Diffusers LoRA weights (`pytorch_lora_weights.safetensors`, rank {rank}) on the teacher's own {model}: loaded
onto the teacher's pipeline{with_scheduler}, one step gives the student.

```python
import torch
from diffusers import {imports}

pipe = {cls}.from_pretrained("{teacher_folder}"{load})
pipe.load_lora_weights("{name}"){scheduler}
images = pipe(["a photo of a cat"], num_inference_steps=1, guidance_scale={scale_in},{call}
              generator=torch.Generator().manual_seed(0)).images
```

One {model} evaluation per image from {at}, then the VAE's decoding. {guidance}
The adapters are those of the run's EMA generator at step {step}, with their scale ({scale:g}) folded into the
`lora_B` weights, so they load at diffusers' default scale; `pipe.fuse_lora()` folds them into the {model}.
"""

_EULER_TRAILING = """
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                    final_sigmas_type="zero", use_karras_sigmas=False)"""


def export_lora(run_folder: str | Path, out_folder: str | Path) -> Path:
    """Write a LoRA run's student (``lora_rank`` > 0) of a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline as
    diffusers LoRA weights that the teacher's pipeline loads with ``load_lora_weights``; the same checks as the full
    export (``export_diffusers``) decide whether that pipeline reproduces the student."""
    from safetensors.torch import load_file

    from .integrity import verify_manifest
    from .train.checkpoint import list_checkpoints, read_meta

    run, out = Path(run_folder), Path(out_folder)
    _check_out(out)
    if run.name == "generator":
        run = run.parent
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{run} is not a run folder with a readable config.json ({e}); --lora exports a run of "
                         "`dibregman distill --lora-rank R`") from None
    rank, alpha = int(config.get("lora_rank") or 0), float(config.get("lora_alpha") or 0)
    if rank < 1:
        raise ValueError(f"{run} trained its students fully (lora_rank 0): it has no adapters; export its whole "
                         "student without --lora")
    gen, info = load_generator(run)
    pipe, call = _family_pipeline(gen, info, run / "generator")  # the family's checks, its class and its call
    cls = type(pipe)
    if not hasattr(cls, "load_lora_weights"):
        raise ValueError(f"{cls.__name__} loads no LoRA weights in diffusers; export the whole student without --lora")
    step = info.get("steps")
    ckpt = next((c for c in reversed(list_checkpoints(run / "checkpoints")) if read_meta(c).get("step") == step), None)
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no checkpoint of step {step}, where generator/ was saved, holds its "
                                "adapters; resume the run (--resume) to write them again")
    verify_manifest(ckpt, ("ema.safetensors",), only="ema.safetensors")
    prefix, scale = "denoiser.backbone.unet.", (alpha or rank) / rank
    model = call["model"]
    layers = {}
    for key, value in load_file(str(ckpt / "ema.safetensors")).items():
        if not key.startswith(prefix) or ".lora_" not in key:
            raise ValueError(f"{ckpt / 'ema.safetensors'} holds {key!r}, which is not an adapter of the teacher's "
                             f"{model}; this export reads the adapters of a diffusers teacher's network only")
        name = key[len(prefix):].replace(".default.", ".")  # peft's adapter name out: diffusers' own keys
        layers[name] = value * scale if ".lora_B." in name else value
    flow = math.isinf(gen.sigma_g)  # SD3, Flux: the teacher's own scheduler starts a one-step call at pure noise
    readme = _LORA_README.format(
        teacher=info.get("teacher"), teacher_folder=info["text"]["encoder"], cls=cls.__name__, name=out.name,
        rank=rank, scale=scale, step=step, **call,
        imports=cls.__name__ if flow else f"{cls.__name__}, EulerDiscreteScheduler",
        with_scheduler="" if flow else " with Euler's scheduler at trailing timesteps",
        scheduler="" if flow else _EULER_TRAILING)
    key = "transformer_lora_layers" if model == "transformer" else "unet_lora_layers"
    return _written(out, lambda tmp: cls.save_lora_weights(tmp, **{key: layers}, safe_serialization=True),
                    {**info, "lora": {"rank": rank, "alpha": alpha, "scale_folded": scale, "checkpoint": ckpt.name}},
                    readme)


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_export(out))):
        raise FileExistsError(f"{out} exists and is not an earlier export; choose a new folder or remove it")


def _family_pipeline(gen: Any, info: dict[str, Any], folder: str | Path) -> tuple[Any, dict[str, str]]:
    """A one-step student of a Stable Diffusion 1.x/2.x (SDXL, PixArt-Sigma, SD3, Flux) pipeline as a pipeline of
    the teacher's class: the teacher folder's tokenizers and text encoders, the student's UNet (transformer), the
    VAE saved with it, and a scheduler whose single step is the student's one step (``_one_step_scheduler``)."""
    import diffusers

    den = gen.denoiser
    where = f"{folder}: "
    if info.get("text") and not Path(str(info["text"]["encoder"])).is_dir():
        raise ValueError(where + f"this student's text encoder ({info['text']['encoder']}) is not a pipeline's, so "
                         "there is no pipeline class of its family to export to; use `dibregman sample`")
    model = type(den.unet).__name__
    if not info.get("text") or model not in _FAMILY_CLASSES:
        raise ValueError(where + "only text-to-image students of Stable Diffusion 1.x/2.x, SDXL, PixArt-Sigma, SD3 and "
                         f"Flux pipelines export to their own pipeline class; this one has a {model}")
    if den.kind == "flow" and model not in _FLOW_CLASSES:
        raise ValueError(where + f"a student of a flow-matching {model} has no diffusers pipeline class to go back "
                         "into (only SD3's and Flux's transformers); use `dibregman sample`")
    if gen.steps != 1:
        raise ValueError(where + f"a {gen.steps}-step student re-noises between its steps, which no diffusers "
                         "scheduler of this family does; export a one-step student (--student-steps 1)")
    scheduler, last, timestep = _one_step_scheduler(gen, where)
    teacher_folder = Path(info["text"]["encoder"])
    if not (teacher_folder / "tokenizer").is_dir() or not (teacher_folder / "text_encoder").is_dir():
        raise FileNotFoundError(where + f"the export takes the tokenizer and text encoder from the teacher folder "
                                f"{str(teacher_folder)!r}, which has no tokenizer/ and text_encoder/ now; restore it")
    codec = load_codec_of(folder, info)
    length, (c, h, w) = info["text"]["length"], info["shape"]
    parts = {"vae": codec.vae, "scheduler": scheduler, "local_files_only": True}
    call, load = "", ""  # what the README's call and its from_pretrained add
    guidance_in = 1.0  # the call's guidance_scale
    if model == "PixArtTransformer2DModel":  # T5 at the student's token budget; its own sizes, not binned ones
        from .text.pipeline_prompts import pipeline_class

        cls = diffusers.PixArtAlphaPipeline if pipeline_class(teacher_folder) == "PixArtAlphaPipeline" \
            else diffusers.PixArtSigmaPipeline
        # PixArt-Alpha feeds the size conditions only at its 1024 model's sample size, PixArt-Sigma never
        fed = cls is diffusers.PixArtAlphaPipeline and int(den.unet.config["sample_size"]) == 128
        if den.backbone.sized and not fed:
            raise ValueError(where + f"this student's transformer takes size conditions, which {cls.__name__} feeds "
                             "only to a model of sample size 128 (PixArt-Alpha 1024): its one-step call would fail; "
                             "use `dibregman sample`")
        pipe = cls.from_pretrained(str(teacher_folder), transformer=den.unet, **parts)
        call = (_sized_call(length, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
                + " use_resolution_binning=False, clean_caption=False,")
    elif model == "SD3Transformer2DModel":  # a folder saved without T5 stays without it (the pipeline pads zeros)
        absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if not (teacher_folder / k).is_dir()}
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(teacher_folder), transformer=den.unet, **absent,
                                                                  **parts)
        load = "".join(f", {k}=None" for k in absent)  # diffusers loads a T5-less SD3 folder only when told
        call = _sized_call(length, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    elif model == "FluxTransformer2DModel":  # its guidance input is the call's guidance_scale
        pipe = diffusers.FluxPipeline.from_pretrained(str(teacher_folder), transformer=den.unet, **parts)
        guidance_in = den.backbone.options["embedded_guidance"]
        call = _sized_call(length, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    elif den.backbone.added:  # SDXL: its own class, whose default size gives the student's time ids
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(teacher_folder), unet=den.unet, **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(teacher_folder), unet=den.unet, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **parts)
    if not call and int(pipe.tokenizer.model_max_length) != int(length):
        raise ValueError(where + f"the teacher's tokenizer pads to {pipe.tokenizer.model_max_length} tokens, the "
                         f"student was distilled on {length}: the pipeline would encode prompts differently")
    if model == "FluxTransformer2DModel":
        guidance = (f"Pass `guidance_scale={guidance_in:g}`: Flux reads it as its guidance input, and the student "
                    "was distilled with that input.") if den.backbone.embedded_guidance is not None else \
            "This Flux model has no guidance input; `guidance_scale` is unused."
        noise = (f"`latents` (unit noise of shape [batch, {c}, {h}, {w}], packed as `FluxPipeline._pack_latents` "
                 "packs it)")
    else:
        guidance = ("Keep `guidance_scale` at 1 (or 0): the student was distilled with guidance "
                    f"{info.get('guidance', 1.0):g} already inside it, and a larger value would apply "
                    "classifier-free guidance a second time.")
        noise = f"`latents` (unit noise, shape [batch, {c}, {h}, {w}])"
    at = "pure noise (t = 1)" if math.isinf(last) else f"the scheduler's last noise level (sigma = {last:.6g})"
    # the README's account of the call, shared by the full export's and the LoRA export's
    return pipe, {"at": f"{at}, timestep {timestep}", "call": call, "load": load, "guidance": guidance,
                  "noise": noise, "scale_in": f"{guidance_in:g}",
                  "model": "transformer" if "Transformer" in model else "U-Net"}


_WRAP = "\n" + " " * 14  # the README's call continues on a line of its own


def _sized_call(length: int, height: int, width: int) -> str:
    return f"{_WRAP}max_sequence_length={length}, height={height}, width={width},"

_FLOW_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")
_FAMILY_CLASSES = ("UNet2DConditionModel", "PixArtTransformer2DModel", *_FLOW_CLASSES)


def _one_step_scheduler(gen: Any, where: str) -> tuple[Any, float, int]:
    """The scheduler of the exported pipeline and its one step's ``(sigma, timestep)``.

    A VP student (SD 1.x/2.x, SDXL, PixArt): Euler with trailing timesteps, whose single step from noise level S
    returns the network's x0 at S, the student's step exactly when it was distilled at ``sigma_g`` = S. A flow
    student (SD3, Flux): the teacher's own flow-matching Euler scheduler, whose single step starts at t = 1 and
    returns ``x_1 - v``, the student's step when it was distilled from pure noise (``sigma_g = inf``)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    den = gen.denoiser
    if den.kind == "flow":
        if not math.isinf(gen.sigma_g):
            raise ValueError(where + "a one-step call of a flow-matching pipeline (SD3, Flux) starts from pure noise "
                             f"at t = 1, an infinite EDM noise level, while this student denoises at sigma_g = "
                             f"{gen.sigma_g:g}; distill with --sigma-g inf to export it (`dibregman sample` runs it "
                             "as is)")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(den.scheduler_config)
        # any mu > 0 shifts t = 1 to itself, exponentially or linearly (the pipeline picks it from the image size)
        scheduler.set_timesteps(1, **({"mu": 1.0} if scheduler.config.get("use_dynamic_shifting") else {}))
        if float(scheduler.sigmas[0]) != 1.0:  # a shift_terminal or inverted grid: the first step is not pure noise
            raise ValueError(where + f"this teacher's {type(scheduler).__name__} (shift_terminal "
                             f"{scheduler.config.get('shift_terminal')}, invert_sigmas "
                             f"{scheduler.config.get('invert_sigmas')}) starts a one-step call at t = "
                             f"{float(scheduler.sigmas[0]):.6g}, not at pure noise (t = 1), so no one-step call of its "
                             "pipeline is the student; use `dibregman sample`")
        return scheduler, math.inf, round(float(scheduler.timesteps[0]))
    if den.kind != "vp" or den.continuous_timesteps:
        raise ValueError(where + "only students of VP pipelines over a discrete noise table (SD 1.x/2.x, SDXL, "
                         "PixArt-Sigma) or of flow-matching transformers (SD3, Flux) export to their pipeline class")
    scheduler = EulerDiscreteScheduler.from_config(den.scheduler_config, timestep_spacing="trailing",
                                                   final_sigmas_type="zero", use_karras_sigmas=False)
    scheduler.set_timesteps(1)
    last = float(scheduler.sigmas[0])
    if abs(gen.sigma_g / last - 1) > 1e-5:
        raise ValueError(where + f"this student was distilled at sigma_g = {gen.sigma_g:g}, but a "
                         f"{type(scheduler).__name__} one-step call denoises at the scheduler's last noise level "
                         f"{last:.6g}; distill with --sigma-g {last:.6g} to export it to its pipeline class "
                         "(`dibregman sample` runs it as is)")
    return scheduler, last, int(scheduler.timesteps[0])


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
