"""Teachers from diffusers: a pixel-space ``UNet2DModel`` plus its scheduler, read from a local folder.

The folder is a saved pipeline (``unet/`` and ``scheduler/`` subfolders) or a folder holding both
``config.json`` + weights of the UNet and ``scheduler_config.json``. Nothing is downloaded: a Hub id must be
fetched into a folder first (e.g. ``hf download <id> --local-dir <folder>``).

Everything is converted at the edge (docs/concepts.md, "Noise convention") so the caller sees an EDM denoiser
``D(x_sigma, sigma, cond) ~ E[x0 | x_sigma]`` with ``x_sigma = x0 + sigma n``:

* discrete VP (DDPM, DDIM, EulerDiscrete): ``alpha_bar`` comes from the scheduler itself, the model input is
  ``x_t = x_sigma / sqrt(1 + sigma^2)`` and its timestep is the *continuous* index found by interpolating
  ``log sigma`` linearly over the scheduler's discrete ``log sigma_k`` (what diffusers' Euler and Karras
  samplers do), so any sigma in ``[sigma_min, sigma_max]`` is valid and ``sigma_k`` gives exactly ``k``;
  outside that range the timestep is clamped to the trained grid (the conversions themselves stay exact).
  Outputs: epsilon ``x0 = x_sigma - sigma eps``; v ``x0 = sqrt(ab) x_t - sqrt(1-ab) v``; sample ``x0 = out``.
* rectified flow (FlowMatchEulerDiscrete, ``x_t = (1-t) x0 + t n``): ``t = sigma / (1+sigma)``, model input
  ``x_t = x_sigma / (1+sigma)``, timestep ``t * num_train_timesteps`` (as diffusers feeds it; ``shift`` only
  moves the sampling grid, not this map), velocity ``v = n - x0`` gives ``x0 = x_t - t v``.

Sampler post-processing (``clip_sample``, thresholding) is not part of the denoiser and is not applied. Every
VP sampler over the discrete ``alpha_bar`` table (PNDM, LMS, DPM-Solver, UniPC, ...) gives the same denoiser: the
sampler only chooses where to evaluate it.

A pipeline folder with a ``vae/`` (Stable Diffusion 1.x/2.x: ``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP) is
a latent teacher: everything above happens on the VAE's scaled latents, and the VAE (``teachers/latent.py``)
decodes for grids, metrics and samples. A Stable Diffusion 3 folder (``transformer/`` with an
``SD3Transformer2DModel``, flow matching) has the same conversion around a transformer backbone (``dit.py``) and
the pipeline's own prompt handling (``text/pipeline_prompts.py``); so does a Flux folder
(``FluxTransformer2DModel``: packed latents, position ids, a guidance embedding).

The conversion lives in ``DiffusersDenoiser``: a ``Precond`` whose four coefficients are the scheduler's VP or
flow parameterisation (``schedules.py``), so it is trained and saved like our own networks; the teacher is
a frozen wrapper around one, and students (``distill --teacher diffusers:<folder>``) start from copies of it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nets.arch import check_arch_size
from ..precond import Precond
from ..schedules import (
    VP_PREDICTIONS,
    FlowParameterisation,
    Parameterisation,
    VPParameterisation,
    flow_sigma_from_t,
)
from .dit import TRANSFORMER_CLASSES, transformer_backbone, unpack_text
from .latent import VAE_FOLDER, LatentCodec, load_codec

Tensor = torch.Tensor

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                 # samplers over the same discrete alpha_bar table (SD 1.5 ships PNDM): the denoiser is the same
                 "PNDMScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                 "KDPM2DiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "UniPCMultistepScheduler", "DEISMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
SCHEDULERS = VP_SCHEDULERS + FLOW_SCHEDULERS
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
MODEL_CLASSES = UNET_CLASSES + TRANSFORMER_CLASSES
# models whose text conditions come from several encoders, read through that pipeline class's encode_prompt
MULTI_ENCODER = {"text_time": ("StableDiffusionXLPipeline",), "SD3Transformer2DModel": ("StableDiffusion3Pipeline",),
                 "FluxTransformer2DModel": ("FluxPipeline",),
                 "PixArtTransformer2DModel": ("PixArtSigmaPipeline", "PixArtAlphaPipeline")}
SCHEDULER_FILE = "scheduler_config.json"
UNET_FILE = "config.json"
ARCH_KIND = "diffusers"  # generator.json's arch kind for a student made from a diffusers teacher


class DiffusersUNet(nn.Module):
    """A ``UNet2DModel`` called in its own conventions ``F(x_t, timestep, class_labels)``, or a text
    ``UNet2DConditionModel`` as ``F(x_t, timestep, encoder_hidden_states)``: the backbone of a
    ``DiffusersDenoiser``, with what our training code reads from an image backbone (``unet`` for gradient
    checkpointing, ``feature_channels`` and ``features`` for critic heads)."""

    def __init__(self, unet: nn.Module, options: dict | None = None):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.feature_channels = int(cfg["block_out_channels"][-1])  # what the mid block returns
        self.text = type(unet).__name__ == "UNet2DConditionModel"
        self.num_classes = 0 if self.text else int(cfg.get("num_class_embeds") or 0)
        self.options: dict = {}
        # SDXL: pooled text embeddings (packed after the tokens, teachers/dit.py) and size / crop "time ids"
        self.added = self.text and cfg.get("addition_embed_type") == "text_time"
        if self.added:
            ids = (options or {}).get("time_ids")
            if not isinstance(ids, list | tuple) or len(ids) != 6:
                raise ValueError("an SDXL UNet needs its six time ids (original size, crop corner, target size); "
                                 "the loader computes them from the VAE's image size")
            self.options = {"time_ids": [float(v) for v in ids]}
            time_dims = 6 * int(cfg["addition_time_embed_dim"])
            self.pooled_dim = int(cfg["projection_class_embeddings_input_dim"]) - time_dims

    def _text(self, cond: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
        if not self.added:
            return cond, None
        hidden, pooled = unpack_text(cond, self.pooled_dim)
        ids = torch.tensor(self.options["time_ids"], device=cond.device, dtype=cond.dtype)
        return hidden, {"text_embeds": pooled, "time_ids": ids.expand(len(cond), 6)}

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.text:
            hidden, added = self._text(cond)
            return self.unet(x_t, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added,
                             return_dict=False)[0]
        return self.unet(x_t, timestep, class_labels=cond, return_dict=False)[0]

    def features(self, x_t: Tensor, timestep: Tensor, labels: Tensor | None = None) -> Tensor:
        """Bottleneck activations ``[B, feature_channels, h, w]``: steps 0-4 of ``UNet2DModel.forward``
        (input centring, time and class embedding, down blocks, mid block), without the decoder."""
        if self.text:
            from ..nets.text_unet import cond_unet_features

            hidden, added = self._text(labels)
            return cond_unet_features(self.unet, x_t, timestep, hidden, added_cond_kwargs=added)
        u, cfg = self.unet, self.unet.config
        if cfg["center_input_sample"]:
            x_t = 2 * x_t - 1.0
        emb = u.time_embedding(u.time_proj(timestep.expand(x_t.shape[0])).to(u.dtype))
        if u.class_embedding is not None:
            if cfg.get("class_embed_type") == "timestep":
                labels = u.time_proj(labels)
            emb = emb + u.class_embedding(labels).to(u.dtype)
        skip, h = x_t, u.conv_in(x_t)
        for block in u.down_blocks:
            if hasattr(block, "skip_conv"):  # the "skip" block types also carry the input image down
                h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return u.mid_block(h, emb) if u.mid_block is not None else h


class DiffusersDenoiser(Precond):
    """A diffusers UNet (or SD3 transformer) + its scheduler's conventions as a trainable EDM denoiser.

    A ``Precond`` whose parameterisation is the scheduler's VP or flow convention (``schedules.py``) and whose
    network is called in diffusers' conventions (its dtype, its conditions), so students start from a copy of
    it as from one of our networks. Its state dict is the UNet's weights (``backbone.unet.*``); the
    conversion is rebuilt from ``arch()`` (the UNet and scheduler configs), so a saved generator reloads
    offline with ``from_arch``. The scheduler itself is not kept: only its noise table is needed.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, sigma_data: float = 0.5, options: dict | None = None):
        sched_name = type(scheduler).__name__
        if sched_name not in SCHEDULERS:
            raise ValueError(f"unsupported diffusers scheduler {sched_name}; supported: {', '.join(SCHEDULERS)}")
        cfg = scheduler.config
        if sched_name in FLOW_SCHEDULERS:
            if cfg.get("invert_sigmas", False):  # t = 1 would then be data, not noise: another convention
                raise ValueError(f"{sched_name} with invert_sigmas=True is not supported (x_t = (1-t) x0 + t n only)")
            param: Parameterisation = FlowParameterisation(cfg["num_train_timesteps"])
        else:
            if cfg.get("use_flow_sigmas"):  # a flow model sampled by a DPM-Solver (Sana): another convention
                raise ValueError(f"{sched_name} with use_flow_sigmas=True is not supported: read the model with "
                                 "FlowMatchEulerDiscreteScheduler (its scheduler_config.json)")
            pred = cfg.get("prediction_type", "epsilon")
            pred = "sample" if pred == "original_sample" else pred  # Euler's alias
            if pred not in VP_PREDICTIONS:
                raise ValueError(f"unsupported prediction_type {pred!r} for {sched_name}; supported: "
                                 f"{', '.join(VP_PREDICTIONS)} (and velocity via FlowMatchEulerDiscreteScheduler)")
            # Euler's EDM-style variant feeds 0.25 log sigma instead of an index (diffusers only does it for v)
            continuous = (sched_name == "EulerDiscreteScheduler" and pred == "v_prediction"
                          and cfg.get("timestep_type", "discrete") == "continuous")
            try:
                param = VPParameterisation(scheduler.alphas_cumprod, pred, continuous)
            except ValueError as e:
                raise ValueError(f"{sched_name}: {e}") from None
        ucfg = unet.config
        transformer = type(unet).__name__ in TRANSFORMER_CLASSES
        if transformer and param.kind != "flow" and type(unet).__name__ != "PixArtTransformer2DModel":
            raise ValueError(f"{type(unet).__name__} is a flow-matching model: it needs "
                             f"FlowMatchEulerDiscreteScheduler, not {sched_name}")
        if type(unet).__name__ == "UNet2DConditionModel":
            extra = {k: ucfg.get(k) for k in ("class_embed_type", "addition_embed_type", "num_class_embeds",
                                              "encoder_hid_dim") if ucfg.get(k)}
            if extra and extra != {"addition_embed_type": "text_time"}:  # SDXL's pooled text + time ids are read
                raise ValueError(f"UNet2DConditionModel with {extra} is not supported: only text conditioning "
                                 "through encoder_hidden_states (cross-attention), as in Stable Diffusion 1.x/2.x, "
                                 "and SDXL's added text_time conditions")
        if ucfg.get("time_embedding_type", "positional") != "positional":  # those embed integer steps or sigma
            raise ValueError(f"UNet time_embedding_type {ucfg.get('time_embedding_type')!r} is not supported; "
                             "only 'positional' takes the continuous timesteps this teacher feeds")
        super().__init__(transformer_backbone(unet, options) if transformer else DiffusersUNet(unet, options),
                         sigma_data, param)
        self.scheduler_class = sched_name
        self.scheduler_config = _plain(cfg)  # for arch(): the scheduler is rebuilt from it, not pickled
        if transformer:
            self.shape: tuple[int, ...] = self.backbone.sample_shape
        else:
            self.shape = (int(ucfg["in_channels"]), *_size(ucfg))
        self.num_classes = self.backbone.num_classes
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        if isinstance(param, VPParameterisation):
            self.sigma_min, self.sigma_max = param.sigma_min, param.sigma_max
        else:
            ts = scheduler.sigmas.double()
            ts = ts[(ts > 0) & (ts < 1)]  # t = 1 is pure noise: EDM sigma = inf, so the range stops one step short
            if len(ts) == 0:
                raise ValueError(f"{sched_name}: no flow time strictly between 0 and 1 in its schedule")
            self.sigma_min = float(flow_sigma_from_t(ts.min()))
            self.sigma_max = float(flow_sigma_from_t(ts.max()))

    @property
    def kind(self) -> str:
        """``vp`` or ``flow``: the convention the model was trained in."""
        return self.parameterisation.kind

    @property
    def prediction_type(self) -> str:
        """What the model outputs: ``epsilon``, ``v_prediction`` or ``sample`` (VP), ``velocity`` (flow)."""
        return self.parameterisation.prediction

    @property
    def continuous_timesteps(self) -> bool:
        return bool(getattr(self.parameterisation, "continuous", False))

    @property
    def unet(self) -> nn.Module:
        return self.backbone.unet

    # --- saving and rebuilding ----------------------------------------------------------------------------

    def arch(self) -> dict[str, Any]:
        """JSON-able description that ``from_arch`` rebuilds (weights aside), as saved in generator.json."""
        options = getattr(self.backbone, "options", None)  # what a transformer's config lacks (Flux: latent size)
        return {"kind": ARCH_KIND, "unet_class": type(self.unet).__name__, "unet_config": _plain(self.unet.config),
                "scheduler_class": self.scheduler_class, "scheduler_config": dict(self.scheduler_config),
                **({"options": dict(options)} if options else {})}

    @classmethod
    def from_arch(cls, arch: dict[str, Any], sigma_data: float = 0.5) -> DiffusersDenoiser:
        """The denoiser ``arch()`` describes, with freshly initialised weights; offline (configs only)."""
        import diffusers

        if not isinstance(arch, dict) or arch.get("kind") != ARCH_KIND:
            raise ValueError(f"not a diffusers arch (kind {ARCH_KIND!r}): {arch!r}")
        name = arch.get("scheduler_class")
        if name not in SCHEDULERS:
            raise ValueError(f"arch names unsupported scheduler {name!r}; supported: {', '.join(SCHEDULERS)}")
        unet_class = arch.get("unet_class", "UNet2DModel")  # "unet": the denoising model, a UNet or a transformer
        if unet_class not in MODEL_CLASSES:
            raise ValueError(f"arch names unsupported model class {unet_class!r}; supported: "
                             f"{', '.join(MODEL_CLASSES)}")
        check_arch_size(arch)
        try:
            unet = getattr(diffusers, unet_class).from_config(arch["unet_config"])
            scheduler = getattr(diffusers, name).from_config(arch["scheduler_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"cannot build a diffusers denoiser from arch ({e})") from None
        return cls(unet, scheduler, sigma_data, arch.get("options"))

    # --- sigma <-> the UNet's timestep ----------------------------------------------------------------

    def timestep_from_sigma(self, sigma: Tensor) -> Tensor:
        """The ``timestep`` the UNet is called with at EDM noise level ``sigma`` (float64 where possible)."""
        return self.parameterisation.timestep(sigma)

    def sigma_from_timestep(self, timestep: Tensor) -> Tensor:
        """Inverse of ``timestep_from_sigma`` on the trained range (VP: log-linear between the discrete sigmas)."""
        return self.parameterisation.sigma_from_timestep(timestep)

    # --- the network F, called in diffusers' conventions ---------------------------------------------------

    def _model_inputs(self, x_in: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(x_t, cond)`` as the model takes them: its dtype, and the condition it needs (or none)."""
        if self.backbone.text:
            if cond is None:
                raise ValueError("this diffusers model is text-conditional: pass cond (text encoder hidden states; "
                                 "the teacher supplies the empty prompt's for classifier-free guidance)")
            return x_in.to(self.unet.dtype), cond.to(self.unet.dtype)
        if self.unet.class_embedding is not None and cond is None:
            raise ValueError(f"this diffusers model is class-conditional ({self.num_classes} classes): "
                             "pass cond (class labels)")
        return x_in.to(self.unet.dtype), cond if self.unet.class_embedding is not None else None

    def _network(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        x_t, cond = self._model_inputs(x_in, cond)
        out = self.backbone(x_t, c_noise, cond).to(x_in.dtype)
        if out.shape[1] == 2 * x_in.shape[1]:  # learned variance (improved DDPM): the mean half comes first
            out = out[:, : x_in.shape[1]]
        return out

    def _network_features(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        x_t, cond = self._model_inputs(x_in, cond)
        return self.backbone.features(x_t, c_noise, cond)



class DiffusersTeacher(nn.Module):
    """A frozen ``DiffusersDenoiser`` (the Teacher protocol): a diffusers ``UNet2DModel`` + scheduler.

    ``sigma_data`` defaults to 0.5: diffusers pixel models are trained on images in [-1, 1], whose spread EDM
    takes as 0.5 (its CIFAR-10 value); pass another value for other data. A latent pipeline's teacher
    (``codec``: its VAE, ``teachers/latent.py``) lives on the scaled latents, whose ``scaling_factor`` is chosen
    to give them unit variance, so the loader passes 1.0 there; ``shape`` is then the latents' shape and
    ``image_shape`` the decoded images'.

    ``network`` is the wrapped denoiser: students start from a copy of it, so they compute exactly the
    teacher's converted denoiser at step 0. As with ``NetworkTeacher``, calls run without autograd unless
    ``no_grad=False``, the module stays in eval mode, and its parameters are frozen (the students' copies are
    made trainable where they are built).
    """

    def __init__(self, unet: nn.Module, scheduler: Any, sigma_data: float = 0.5, no_grad: bool = True,
                 source: str | None = None, text_encoder: Any = None, codec: LatentCodec | None = None,
                 options: dict | None = None, meta: dict[str, Any] | None = None):
        super().__init__()
        self.net = DiffusersDenoiser(unet, scheduler, sigma_data, options).eval().requires_grad_(False)
        if codec is not None and codec.latent_channels != self.net.shape[0]:
            raise ValueError(f"{source or 'this pipeline'}: its UNet takes {self.net.shape[0]} input channels but its "
                             f"VAE makes {codec.latent_channels}-channel latents (an inpainting or depth UNet takes "
                             "extra channels, which one-step students cannot supply): use a text-to-image pipeline")
        self.codec = codec
        self.scheduler = scheduler
        self.source = source
        self.no_grad = no_grad
        net = self.net
        self.shape, self.num_classes, self.sigma_data = net.shape, net.num_classes, net.sigma_data
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        self.image_shape = codec.image_shape(net.shape) if codec is not None else net.shape
        self.text: dict[str, Any] | None = None
        self.class_names: tuple[str, ...] = ()
        if net.backbone.text:  # Stable Diffusion's conventions: the empty prompt is the unconditional input
            if text_encoder is None:
                raise ValueError("a text-conditional UNet needs its text encoder (tokenizer/ and text_encoder/)")
            self.text = {"encoder": text_encoder.spec, "length": text_encoder.max_length}
            self.register_buffer("null_hidden", text_encoder.unconditional(), persistent=False)
            self.guidance = 1.0  # classifier-free guidance scale (1: none)
        self.__dict__["loaded_text_encoder"] = text_encoder  # not a submodule: for take_text_encoder, once
        # a teacher trained here (teachers/trained.py): its data, classes, captions and EDM sampling range
        self.meta: dict[str, Any] = dict(meta or {})
        self.data_spec: str | None = self.meta.get("data")
        if self.meta:
            self.class_names = tuple(self.meta.get("class_names") or ())
            self.sigma_min = float(self.meta.get("sigma_min", self.sigma_min))
            self.sigma_max = float(self.meta.get("sigma_max", self.sigma_max))
            if self.text is not None and self.meta.get("text", {}).get("templates"):
                self.text["templates"] = list(self.meta["text"]["templates"])

    @property
    def embeds_guidance(self) -> bool:
        """A guidance-distilled model (Flux dev): the scale is one of its inputs, not two calls extrapolated."""
        return getattr(self.net.backbone, "embedded_guidance", None) is not None

    @property
    def guidance(self) -> float:
        if self.text is None:  # only text pipelines are guided here (hasattr(teacher, "guidance") is then False)
            raise AttributeError("guidance")
        return self._guidance

    @guidance.setter
    def guidance(self, scale: float) -> None:
        self._guidance = float(scale)
        if self.embeds_guidance:  # before the students are copied from the network, so they share it
            self.net.backbone.set_embedded_guidance(scale)

    @property
    def network(self) -> DiffusersDenoiser:
        return self.net

    @property
    def unet(self) -> nn.Module:
        return self.net.unet

    @property
    def kind(self) -> str:
        return self.net.kind

    @property
    def prediction_type(self) -> str:
        return self.net.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.net.num_train_timesteps

    def timestep_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.net.timestep_from_sigma(sigma)

    def sigma_from_timestep(self, timestep: Tensor) -> Tensor:
        return self.net.sigma_from_timestep(timestep)

    def train(self, mode: bool = True) -> DiffusersTeacher:
        return super().train(False)  # a teacher is frozen; keep eval-mode behaviour whatever the caller does

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """``D(x, sigma, cond)``; a text teacher takes encoder hidden states (None: the empty prompt), with
        classifier-free guidance ``D_u + w (D_c - D_u)`` when ``guidance`` w != 1."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.no_grad):
            if self.text is None:
                return self.net(x, sigma, cond)
            null = self.null_hidden.expand(x.shape[0], -1, -1)
            d = self.net(x, sigma, null if cond is None else cond)
            if cond is None or self.guidance == 1.0 or self.embeds_guidance:
                return d
            return torch.lerp(self.net(x, sigma, null), d, self.guidance)


def _size(config: Any) -> tuple[int, int]:
    size = config["sample_size"]
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _plain(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON (tuples as lists, arrays as lists), without its private ``_`` keys."""
    def default(v: Any) -> Any:
        if hasattr(v, "tolist"):  # numpy arrays or tensors, e.g. a scheduler's trained_betas
            return v.tolist()
        raise TypeError(f"config value {v!r} is not JSON-able")

    return {k: v for k, v in json.loads(json.dumps(dict(config), default=default)).items() if not k.startswith("_")}


# --- loading -----------------------------------------------------------------------------------------------


def lazy_loading() -> bool:
    """diffusers' ``low_cpu_mem_usage`` needs accelerate; without it diffusers warns, then loads eagerly."""
    return importlib.util.find_spec("accelerate") is not None


def _find(folder: Path, sub: str, name: str) -> Path | None:
    """The folder holding ``name``: ``folder/sub`` (a saved pipeline) or ``folder`` itself."""
    for d in (folder / sub, folder):
        if (d / name).is_file():
            return d
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return doc


def load_diffusers_teacher(folder: str | Path, sigma_data: float | None = None, no_grad: bool = True
                           ) -> DiffusersTeacher:
    """Read a local diffusers folder (see the module docstring) onto the CPU in float32, offline. ``sigma_data``:
    0.5 for pixels in [-1, 1] and 1.0 for a VAE's scaled latents unless given."""
    import diffusers  # imported here: the other teachers do not need it loaded

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers teacher folder {str(folder)!r} does not exist; only local folders are "
                                "read (nothing is downloaded): fetch a Hub model first, e.g. `hf download <id> "
                                "--local-dir <folder>`, and pass that folder")
    sched_dir = _find(folder, "scheduler", SCHEDULER_FILE)
    if sched_dir is None:
        raise FileNotFoundError(f"diffusers teacher folder {str(folder)!r} has no scheduler config: expected "
                                f"scheduler/{SCHEDULER_FILE} or {SCHEDULER_FILE} (scheduler.save_pretrained)")
    unet_dir = _find(folder, "unet", UNET_FILE) or (folder / "transformer" if (folder / "transformer" / UNET_FILE)
                                                    .is_file() else None)
    if unet_dir is None:
        raise FileNotFoundError(f"diffusers teacher folder {str(folder)!r} has no UNet: expected unet/{UNET_FILE} "
                                f"(or transformer/{UNET_FILE}) or {UNET_FILE} with its weights (unet.save_pretrained)")
    sched_name = _read_json(sched_dir / SCHEDULER_FILE).get("_class_name")
    if sched_name not in SCHEDULERS:
        raise ValueError(f"{str(sched_dir / SCHEDULER_FILE)!r}: unsupported scheduler {sched_name!r}; supported: "
                         f"{', '.join(SCHEDULERS)}")
    unet_json = _read_json(unet_dir / UNET_FILE)
    unet_name = unet_json.get("_class_name")
    if unet_name == "Transformer2DModel" and unet_json.get("norm_type") == "ada_norm_single":
        unet_name = "PixArtTransformer2DModel"  # the Hub's PixArt configs name the legacy class; diffusers remaps it
    if unet_name not in MODEL_CLASSES:
        raise ValueError(f"{str(unet_dir / UNET_FILE)!r}: unsupported model class {unet_name!r}; supported: "
                         f"{', '.join(MODEL_CLASSES)} (Sana transformers are not read yet)")
    _refuse_unsupported(folder)
    family = MULTI_ENCODER.get("text_time" if unet_json.get("addition_embed_type") == "text_time" else unet_name)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    if family is not None and index.get("_class_name") not in family:  # its prompts are encoded by that class
        raise ValueError(f"{str(folder)!r}: a {unet_name} with these conditions is read as a {' or '.join(family)} "
                         f"folder, but its model_index.json names {index.get('_class_name')!r}: save the whole "
                         f"pipeline with {family[0]}.save_pretrained")
    codec = load_codec(folder / VAE_FOLDER) if (folder / VAE_FOLDER).is_dir() else None  # a latent pipeline
    encoder = None
    if unet_name == "UNet2DConditionModel" or unet_name in TRANSFORMER_CLASSES:
        from ..text import load_text_encoder

        if not ((folder / "tokenizer").is_dir() and (folder / "text_encoder").is_dir()):
            raise FileNotFoundError(f"{str(folder)!r} has a text-conditional UNet but no tokenizer/ and text_encoder/ "
                                    "folders beside it: save the whole pipeline (pipeline.save_pretrained)")
        encoder = load_text_encoder(str(folder.resolve()))
    scheduler = getattr(diffusers, sched_name).from_pretrained(str(sched_dir), local_files_only=True)
    unet = getattr(diffusers, unet_name).from_pretrained(str(unet_dir), local_files_only=True,
                                                         torch_dtype=torch.float32, low_cpu_mem_usage=lazy_loading())
    if sigma_data is None:  # pixels in [-1, 1]: EDM's 0.5; scaled latents have unit variance
        sigma_data = 1.0 if codec is not None else 0.5
    options = None
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: the pipeline's default size, no crop
        if codec is None:
            raise FileNotFoundError(f"{str(folder)!r}: an SDXL UNet needs the pipeline's vae/ beside it")
        h, w = codec.image_shape(tuple(int(n) for n in (unet.config["in_channels"], *_size(unet.config))))[1:]
        options = {"time_ids": [h, w, 0, 0, h, w]}
    if unet_name == "FluxTransformer2DModel":  # its config has no sample size: the VAE's, over its factor
        if codec is None:
            raise FileNotFoundError(f"{str(folder)!r}: a Flux transformer needs the pipeline's vae/ beside it")
        options = {"latent_size": int(codec.vae.config["sample_size"]) // codec.factor}
    if unet_name == "PixArtTransformer2DModel" and getattr(unet, "use_additional_conditions", False):
        if codec is None:  # PixArt-Alpha 1024: conditioned on the image's size in pixels
            raise FileNotFoundError(f"{str(folder)!r}: a PixArt transformer with size conditions needs the "
                                    "pipeline's vae/ beside it")
        side = int(unet.config["sample_size"])
        options = {"image_size": list(codec.image_shape((int(unet.config["in_channels"]), side, side))[1:])}
    return DiffusersTeacher(unet, scheduler, sigma_data=sigma_data, no_grad=no_grad, source=str(folder),
                            text_encoder=encoder, codec=codec, options=options)


def _refuse_unsupported(folder: Path) -> None:
    """Pipelines whose denoiser is not a text- or class-conditional image UNet: said in one line, before loading."""
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    name = index.get("_class_name", "")
    missing = [sub for sub in (VAE_FOLDER, "tokenizer", "text_encoder") if index.get(sub) and index[sub] != [None, None]
               and not (folder / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r}: its model_index.json lists {', '.join(missing)} but the folder "
                                f"has no {'/, '.join(missing)}/: copy the whole pipeline (pipeline.save_pretrained)")
    if any(word in str(name) for word in ("Video", "Img2Img", "Inpaint", "Upscale", "Depth", "ControlNet")):
        raise ValueError(f"{str(folder)!r} is a {name} folder: only text-to-image (or unconditional / class) "
                         "pipelines distill to a one-step generator; pass the text-to-image pipeline it derives from")
    if (folder / "prior").is_dir():
        raise ValueError(f"{str(folder)!r} is a two-stage (prior + decoder) pipeline: not supported; U-Net pipelines "
                         "(Stable Diffusion 1.x/2.x, pixel UNets) and SD3 transformer pipelines are")
