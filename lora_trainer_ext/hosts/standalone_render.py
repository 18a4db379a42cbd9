"""Grid cells rendered headless on the standalone host: txt2img as the WebUI samples it, without a WebUI.

The path follows WebUI 1.10.1's k-diffusion txt2img: the initial noise comes from a CPU generator seeded
with the cell's seed (the WebUI's "RNG: CPU" setting, which the infotext records so txt2img reproduces
the noise), scaled by the first sigma; the model is wrapped as k-diffusion's CompVis denoiser (sigmas
from the model's alphas_cumprod, the UNet called at the continuous timestep interpolated in log sigma;
eps or v prediction); classifier-free guidance mixes the prompt's and the negative prompt's
predictions (for SDXL an empty negative prompt is zero conditioning, as the WebUI does); then the VAE
decodes. Samplers: Euler and DPM++ 2M, on the Automatic (the sampler's own), Uniform, Karras or
Exponential schedule. Emphasis syntax in prompts is not interpreted (see prompt.py). Against WebUI
1.10.1's own txt2img with RNG on the CPU, on a tiny checkpoint, pixels agree to within float noise
(tests/test_render.py runs that comparison when a WebUI is given).

A cell's LoRA file is loaded into a `network.Network` (lycoris modules in bypass mode: the host's
weights are never written) with each module's scale from the file's own alpha, the multiplier set to
the cell's weight, attached for that one image and detached afterwards, so the host is left exactly as
it was. The last file loaded is kept for the next cell (a grid row shares one epoch).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import LoraMakerError
from ..grids.plan import Cell, RenderSettings
from ..grids.renderer import Rendered, format_infotext
from ..training import lora_file
from ..training.network import Network, NetworkConfig
from .host import SDXL, SizeInfo, crossattn

# sampler -> the schedule "Automatic" means for it (the WebUI's sampler options); None: Uniform, the
# model's own discrete timesteps, which the infotext then calls "Automatic"
SAMPLERS: dict[str, str | None] = {"Euler": None, "DPM++ 2M": "Karras"}
SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential")
KARRAS_RHO = 7.0


def check_settings(settings: RenderSettings, multiple: int = 8) -> None:
    """Refuse what the standalone sampler cannot render, before any image is made. The UNet's skip
    connections need the latent to halve evenly at each level: sides are multiples of `multiple`
    (the WebUI patches the UNet to allow any multiple of 8; here SD1/SD2 need 64, SDXL 32)."""
    if settings.sampler not in SAMPLERS:
        raise LoraMakerError(f"sampler {settings.sampler!r} is not available headless: choose "
                             f"{' or '.join(SAMPLERS)} (the WebUI renders every sampler)")
    if settings.scheduler not in SCHEDULES:
        raise LoraMakerError(f"schedule type {settings.scheduler!r} is not available headless: choose one of "
                             f"{', '.join(SCHEDULES)}")
    if settings.steps < 1 or settings.cfg_scale < 1:
        raise LoraMakerError(f"steps must be at least 1 and CFG scale at least 1 "
                             f"(got {settings.steps} steps, CFG {settings.cfg_scale})")
    if min(settings.width, settings.height) < multiple or settings.width % multiple or settings.height % multiple:
        raise LoraMakerError(f"width and height must be multiples of {multiple} for the standalone renderer "
                             f"(got {settings.width}x{settings.height})")


def schedule_label(settings: RenderSettings) -> str:
    """The schedule as the WebUI's infotext names it: Automatic resolved to the sampler's own, if any."""
    if settings.scheduler == "Automatic":
        return SAMPLERS[settings.sampler] or "Automatic"
    return settings.scheduler


# ------------------------------------------------------------------------------------ the schedule

class NoiseSchedule:
    """k-diffusion's discrete schedule of a model trained on `alphas_cumprod`: sigma_t = sqrt((1-ᾱ)/ᾱ)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.detach().float().cpu()
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log().double().numpy()  # increasing with t

    @property
    def sigma_min(self) -> float:
        return math.exp(self.log_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return math.exp(self.log_sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """The continuous timestep of `sigma`, linear in log sigma between the model's timesteps."""
        return float(np.interp(math.log(sigma), self.log_sigmas, np.arange(len(self.log_sigmas))))

    def sigmas(self, label: str, steps: int) -> list[float]:
        """`steps` decreasing sigmas of schedule `label` (Uniform, Karras, Exponential), then 0."""
        if label in ("Uniform", "Automatic"):
            t = np.linspace(len(self.log_sigmas) - 1, 0, steps)
            out = np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas))
        elif label == "Karras":
            ramp = np.linspace(0, 1, steps)
            lo, hi = self.sigma_min ** (1 / KARRAS_RHO), self.sigma_max ** (1 / KARRAS_RHO)
            out = (hi + ramp * (lo - hi)) ** KARRAS_RHO
        elif label == "Exponential":
            out = np.exp(np.linspace(math.log(self.sigma_max), math.log(self.sigma_min), steps))
        else:
            raise LoraMakerError(f"unknown schedule type {label!r}")
        return [float(s) for s in out] + [0.0]


# ------------------------------------------------------------------------------------ the samplers

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (x, sigma) -> the denoised x0


def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """k-diffusion's Euler (no churn): one model call per step along the ODE's derivative."""
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        derivative = (x - denoise(x, sigma)) / sigma
        x = x + derivative * (sigma_next - sigma)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) as k-diffusion steps it: second order from the previous step's
    x0 estimate, in t = -log sigma; the last step (to sigma 0) lands on the x0 estimate."""
    previous, h_last = None, None
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma) - math.log(sigma_next)
        mixed = denoised
        if previous is not None:
            r = h_last / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (sigma_next / sigma) * x - math.expm1(-h) * mixed
        previous, h_last = denoised, h
    return x


_SAMPLE = {"Euler": sample_euler, "DPM++ 2M": sample_dpmpp_2m}


# --------------------------------------------------------------------------------------- the LoRA

@dataclass
class LoadedLora:
    path: Path
    stamp: tuple[int, int] | None  # (mtime_ns, size) when read: a rewritten file is loaded again
    network: Network
    short_hash: str  # the WebUI's Lora shorthash: the first 12 digits of sshs_model_hash


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def network_config(tensors: dict[str, torch.Tensor], name: str) -> NetworkConfig:
    """The network a kohya-named LoRA file was trained as, from its tensors' shapes: the rank of the
    linear and 1x1 modules, and of the 3x3 convolutions that make it a LoCon."""
    ranks, conv_ranks = set(), set()
    for key, tensor in tensors.items():
        if key.endswith(".lora_down.weight"):
            (conv_ranks if tensor.dim() == 4 and tensor.shape[-1] > 1 else ranks).add(int(tensor.shape[0]))
    if len(ranks) != 1 or len(conv_ranks) > 1:
        raise LoraMakerError(f"{name} is not a LoRA of one rank (ranks {sorted(ranks | conv_ranks)}): "
                             f"render it in the WebUI")
    dim = ranks.pop()
    if not conv_ranks:
        return NetworkConfig("lora", dim, float(dim))
    conv_dim = conv_ranks.pop()
    return NetworkConfig("locon", dim, float(dim), conv_dim, float(conv_dim))


def load_lora(host, path: Path) -> LoadedLora:
    """The LoRA file at `path` as a detached `Network` on `host`, scaled by the file's alphas."""
    path = Path(path)
    stamp = file_stamp(path)
    tensors, metadata = lora_file.read_lora(path)
    text_encoder = any(key.startswith("lora_te") for key in tensors)
    if text_encoder and host.kind == SDXL:
        raise LoraMakerError(f"{path.name} holds SDXL text-encoder weights, which the standalone renderer does not "
                             f"apply: render it in the WebUI")
    try:
        network = Network(host, network_config(tensors, path.name), train_text_encoder=text_encoder)
        names = lora_file.from_output_names({k: v.float() for k, v in tensors.items()}, host.kind,
                                            network.module_paths())
        network.load_lora_state_dict(names)
    except LoraMakerError as e:
        raise LoraMakerError(f"{path.name} does not fit this model: {e}") from None
    for part in network.parts:
        part.lycoris.requires_grad_(False)
        for module in part.lycoris.loras:  # the file's alpha, not the constructor's, sets the scale
            module.scale = float(module.alpha) / module.lora_dim
    network.train(False)
    digest = metadata.get("sshs_model_hash") or lora_file.tensor_data_hash(path.read_bytes())
    return LoadedLora(path, stamp, network, digest[:12])


@contextlib.contextmanager
def applied(network: Network, weight: float):
    """`network` patched into the host at multiplier `weight` for the block, then detached."""
    for part in network.parts:
        part.lycoris.set_multiplier(weight)
    network.attach()
    try:
        yield
    finally:
        network.detach()


# ------------------------------------------------------------------------------------ the renderer

class StandaloneRenderer:
    """`render.Renderer` on a `standalone.StandaloneHost`."""

    def __init__(self, host):
        self.host = host
        self.schedule = NoiseSchedule(host.alphas_cumprod)
        # the VAE's downsampling factor: 2 per level after the first
        self.factor = 2 ** (host.vae.decoder.num_resolutions - 1)
        self.multiple = self.factor * 2 ** (len(host.unet.channel_mult) - 1)  # and the UNet's, per level
        self.channels = host.unet.in_channels
        self._lora: LoadedLora | None = None
        self.seconds = {"load": 0.0, "sample": 0.0, "decode": 0.0}  # summed over renders (for `bench grid`)

    def refresh(self) -> None:
        self._lora = None

    def lora(self, path: Path) -> LoadedLora:
        """The LoRA at `path`: the one kept from the last cell, unless another file (or this one
        rewritten since) is asked for."""
        path = Path(path)
        loaded = self._lora
        if loaded is None or loaded.path != path or loaded.stamp != file_stamp(path):
            self._lora = None  # free the old network before building the next
            self._lora = load_lora(self.host, path)
        return self._lora

    def render(self, cell: Cell, settings: RenderSettings) -> Rendered:
        check_settings(settings, self.multiple)
        start = time.perf_counter()
        lora = self.lora(cell.epoch.path) if cell.weight else None
        self.seconds["load"] += time.perf_counter() - start
        with applied(lora.network, cell.weight) if lora else contextlib.nullcontext():
            start = time.perf_counter()
            latents = self.sample(cell, settings)
            self.seconds["sample"] += time.perf_counter() - start
        start = time.perf_counter()
        image = to_image(self.host.decode_latents(latents)[0])  # to the CPU: waits for the GPU's work
        self.seconds["decode"] += time.perf_counter() - start
        infotext = format_infotext(
            cell, settings, Path(self.host.model_name).stem, self.host.model_hash, schedule=schedule_label(settings),
            lora_hash=lora.short_hash if lora else "", clip_skip=int(getattr(self.host, "clip_skip", 1) or 1),
            extra={"RNG": "CPU"})
        return Rendered(image, infotext)

    def noise(self, seed: int, settings: RenderSettings) -> torch.Tensor:
        """The WebUI's initial noise with RNG set to CPU: one [C, H/8, W/8] draw from a seeded CPU generator."""
        shape = (self.channels, settings.height // self.factor, settings.width // self.factor)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn(shape, generator=generator).unsqueeze(0).to(self.host.device)

    @torch.no_grad()
    def sample(self, cell: Cell, settings: RenderSettings) -> torch.Tensor:
        host = self.host
        guided = settings.cfg_scale != 1  # at CFG 1 the negative prompt's prediction cancels out
        conds = self.conditioning(cell, settings, guided)
        # One UNet batch when prompt and negative prompt have as many chunks, else one call each (the WebUI's
        # default, without "pad prompt/negative prompt").
        same = len({tuple(crossattn(c).shape) for c in conds}) == 1
        calls = [(_cat(conds), len(conds))] if same else [(c, 1) for c in conds]
        sigmas = self.schedule.sigmas(schedule_label(settings), settings.steps)
        batch = len(conds)

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            scale = 1 / math.sqrt(sigma**2 + 1)
            x_in = x.repeat(batch, 1, 1, 1)
            t = self.schedule.sigma_to_t(sigma)
            out = torch.cat([host.apply_model(x.repeat(n, 1, 1, 1) * scale, torch.full((n,), t, device=host.device),
                                              cond).float() for cond, n in calls])
            if host.parameterization == "v":  # k-diffusion's CompVisVDenoiser (sigma_data 1)
                denoised = x_in * scale**2 - out * sigma * scale
            else:
                denoised = x_in - out * sigma
            if not guided:
                return denoised
            positive, negative = denoised.chunk(2)
            return negative + (positive - negative) * settings.cfg_scale

        x = self.noise(cell.seed, settings) * sigmas[0]
        return _SAMPLE[settings.sampler](denoise, x, sigmas)

    def conditioning(self, cell: Cell, settings: RenderSettings, guided: bool) -> list:
        """The prompt's (and when guided, the negative prompt's) conditioning, each on its own as the WebUI
        computes them (emphasis rescales within one). The prompt is txt2img's with its <lora:...> tag taken
        out as the WebUI does, which leaves the ", " before it."""
        host = self.host
        prompt = _EXTRA_NETWORKS.sub("", cell.full_prompt())
        prompts = [prompt, cell.negative] if guided else [prompt]
        if host.kind != SDXL:
            return [host.conditioning([p]) for p in prompts]
        size = SizeInfo((settings.height, settings.width), (0, 0), (settings.height, settings.width))
        conds = [host.conditioning([p], [size]) for p in prompts]
        if guided and not cell.negative:  # the WebUI zeroes an empty SDXL negative prompt's text embeddings
            pooled = conds[1]["vector"].shape[1] - 6 * host.size_embed_dim
            conds[1]["crossattn"][:] = 0
            conds[1]["vector"][:, :pooled] = 0
        return conds


def _cat(conds: list):
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


_EXTRA_NETWORKS = re.compile(r"<(\w+):([^>]+)>")  # the WebUI's extra_networks.re_extra_net


def to_image(decoded: torch.Tensor):
    """A decoded [3, H, W] image in [-1, 1] as an RGB PIL image, quantized as the WebUI does (truncating);
    NaNs (a diverged LoRA) become black, which grid scoring flags."""
    from PIL import Image

    pixels = ((torch.nan_to_num(decoded.float(), nan=-1.0) + 1) / 2).clamp(0, 1)
    array = (255.0 * pixels.permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
    return Image.fromarray(array, "RGB")
