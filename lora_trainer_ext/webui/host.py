"""The model the WebUI (A1111 1.10.x) has loaded, as a training `Host` (lora_trainer_ext/hosts/host.py).

Training uses the WebUI's own objects and prompt path, so it sees what txt2img sees: ldm
`LatentDiffusion` for SD1/2, sgm `DiffusionEngine` for SDXL (webui-host.md §2). What cannot be trained
in place is refused before anything changes; `training_session` takes the WebUI's LoRAs and
hypernetworks out of the weights first (they are merged in place) so the LoRA learns against the bare
checkpoint, and SDXL's size conditioning is built per image, as sd-scripts does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import LoraMakerError
from ..hosts.checkpoint import marks_v_prediction
from ..hosts.host import SD1, SD2, SDXL, SizeInfo
from .medvram import out_of_medvram


def check_trainable(sd_model) -> str:
    """The model's kind, or LoraMakerError saying why the WebUI's model cannot be trained in place."""
    from modules import devices, shared

    if importlib.util.find_spec("modules_forge") is not None or hasattr(sd_model, "forge_objects"):
        raise LoraMakerError("training on Forge's loaded model is not supported: use the AUTOMATIC1111 WebUI, or the CLI")
    if not isinstance(sd_model, torch.nn.Module):
        raise LoraMakerError("no Stable Diffusion model is loaded: pick a checkpoint in the WebUI first")
    if getattr(shared.cmd_opts, "lowvram", False):
        raise LoraMakerError("--lowvram moves the UNet to the GPU block by block and cannot train: restart the WebUI "
                             "with --medvram (or --medvram-sdxl) instead, which LoRA Maker trains under")
    from modules import sd_unet

    if sd_unet.current_unet is not None:
        raise LoraMakerError("a custom UNet (e.g. TensorRT) is active: set Settings > SD Unet to None to train")
    if getattr(devices, "fp8", False):
        raise LoraMakerError("the model's weights are stored in fp8: turn off Settings > Optimizations > FP8 weight to train")
    for flag, name in (("is_sd3", "SD3"), ("is_sdxl_inpaint", "SDXL inpainting"), ("is_ssd", "SSD-1B")):
        if getattr(sd_model, flag, False):
            raise LoraMakerError(f"{name} models can't be trained here: load an SD 1.x, 2.x or SDXL base checkpoint")
    if getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn") != "crossattn":
        raise LoraMakerError("inpainting and other conditioned models can't be trained: load a base checkpoint")
    return model_kind(sd_model)


def model_kind(sd_model) -> str:
    """SD1, SD2 or SDXL, by the flags the WebUI sets on the models it loads."""
    return SDXL if getattr(sd_model, "is_sdxl", False) else SD2 if getattr(sd_model, "is_sd2", False) else SD1


def v_sampled_as_eps(sd_model) -> bool:
    """Whether the loaded checkpoint marks itself v-prediction (NoobAI V-Pred's `v_pred` key) while the WebUI,
    which reads v-prediction from a yaml only, samples it as eps."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    if info is None or getattr(sd_model, "parameterization", "eps") != "eps":
        return False
    try:
        stamp = os.stat(info.filename).st_mtime_ns
    except OSError:
        return False
    return _marked_at(info.filename, stamp)


@functools.lru_cache(maxsize=8)
def _marked_at(filename: str, stamp: int) -> bool:
    """`marks_v_prediction`, read once per file version (the plan asks on every change of the form)."""
    return marks_v_prediction(filename)


class WebuiHost:
    """`Host` over `shared.sd_model`. Its text encoders: SD1's HF CLIP, SD2's OpenCLIP, SDXL's HF CLIP and
    OpenCLIP (training/open_clip_lora.py trains OpenCLIP's fused attention under kohya's names)."""

    def __init__(self, sd_model=None):
        from modules import devices, shared

        self.sd_model = sd_model if sd_model is not None else shared.sd_model
        self.kind = check_trainable(self.sd_model)
        m = self.sd_model
        info = getattr(m, "sd_checkpoint_info", None)
        # NoobAI V-Pred without a yaml: the WebUI samples it as eps, but it predicts v (the plan says so)
        self.parameterization = "v" if v_sampled_as_eps(m) else getattr(m, "parameterization", "eps")
        self.model_name = Path(info.filename).name if info is not None else "unknown"
        # The hashes the WebUI already knows (never a second read of the file): its sha256 only once it
        # computed it (it does on load unless --no-hashing), the old 8-digit one always.
        self.model_hash = (getattr(info, "shorthash", None) or "") if info is not None else ""
        self.model_sha256 = (getattr(info, "sha256", None) or "") if info is not None else ""
        self.model_legacy_hash = (getattr(info, "hash", None) or "") if info is not None else ""
        self.device = devices.device
        self.unet = m.model.diffusion_model
        self.dtype = next(self.unet.parameters()).dtype
        self.vae = m.first_stage_model
        self.text_encoders = _text_encoders(m, self.kind)
        # The pristine fp32 schedule: `alphas_cumprod` itself may be overridden for sampling.
        schedule = getattr(m, "alphas_cumprod_original", None)
        self.alphas_cumprod = (schedule if schedule is not None else m.alphas_cumprod).detach().float().cpu()

    @property
    def clip_skip(self) -> int | None:
        """The WebUI's clip skip, which its prompt path applies (SD1 only; SD2/SDXL use their config's layer)."""
        from modules import shared

        return int(shared.opts.CLIP_stop_at_last_layers) if self.kind == SD1 else None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        m = self.sd_model
        vae_dtype = next(self.vae.parameters()).dtype
        # SDXL's VAE overflows in fp16 (NaN latents): encode in fp32 and put it back as it was.
        upcast = self.kind == SDXL and vae_dtype == torch.float16
        with torch.no_grad(), _vae_dtype(self.vae, torch.float32 if upcast else vae_dtype):
            x = images.to(self.device, torch.float32 if upcast else vae_dtype)
            return m.get_first_stage_encoding(m.encode_first_stage(x)).float()

    def conditioning(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> Any:
        m = self.sd_model
        if self.kind != SDXL:
            return m.get_learned_conditioning(captions)  # the WebUI's prompt path: chunks, emphasis, clip skip
        if sizes is None:
            raise ValueError("SDXL conditioning needs each image's sizes")

        def pairs(values):
            return torch.tensor(values, device=self.device, dtype=torch.float32)

        batch = {
            "txt": captions,
            "original_size_as_tuple": pairs([s.original for s in sizes]),
            "crop_coords_top_left": pairs([s.crop_top_left for s in sizes]),
            "target_size_as_tuple": pairs([s.target for s in sizes]),
            "aesthetic_score": pairs([[6.0]] * len(captions)),  # read by the refiner only
        }
        embedders = list(m.conditioner.embedders)
        saved = [(embedder.ucg_rate, embedder.is_trainable) for embedder in embedders]
        for embedder in embedders:
            embedder.ucg_rate = 0.0  # no random caption dropout of sgm's own: the trainer decides dropout
            # sgm runs an embedder that is not "trainable" under no_grad: a text-encoder LoRA needs gradients
            embedder.is_trainable = torch.is_grad_enabled()
        try:
            return m.conditioner(batch)
        finally:
            for embedder, (rate, trainable) in zip(embedders, saved):
                embedder.ucg_rate, embedder.is_trainable = rate, trainable

    def apply_model(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        # The WebUI's patched apply_model casts to the UNet's dtype under its autocast.
        return self.sd_model.apply_model(latents, timesteps, cond).float()


def _text_encoders(sd_model, kind: str) -> list[torch.nn.Module]:
    """The trainable text models inside the WebUI's hijacked embedders (each wrapper's `wrapped` is the
    ldm/sgm embedder): HF CLIP's `transformer`, OpenCLIP's `model`."""
    if kind == SDXL:
        embedders = [e for e in sd_model.conditioner.embedders if getattr(e, "input_key", None) == "txt"]
    else:
        embedders = [sd_model.cond_stage_model]
    found = []
    for embedder in embedders:
        wrapped = getattr(embedder, "wrapped", embedder)
        model = getattr(wrapped, "transformer", None)
        model = model if isinstance(model, torch.nn.Module) else getattr(wrapped, "model", None)
        if isinstance(model, torch.nn.Module):
            found.append(model)
    return found


@contextlib.contextmanager
def _vae_dtype(vae: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    before = next(vae.parameters()).dtype
    if before == dtype:
        yield
        return
    vae.to(dtype)
    try:
        yield
    finally:
        vae.to(before)


@contextlib.contextmanager
def training_session(host: WebuiHost) -> Iterator[None]:
    """The WebUI side of a training run: its LoRAs and hypernetworks unmerged from the weights for the
    run (prompts re-apply them at the next generation), token merging (ToMe) taken out of the UNet for
    the run and put back as it was, --medvram's swapping off for the run (medvram.py), and its memory
    freed afterwards."""
    from modules import devices, sd_models, shared

    tome = getattr(host.sd_model, "applied_token_merged_ratio", 0)
    if not tome and any(type(m).__name__ == "ToMeBlock" for m in host.unet.modules()):
        raise LoraMakerError("token merging (ToMe) was patched into the model by something other than the WebUI's "
                             "Token merging ratio setting: the LoRA would learn through it. Disable what applied it "
                             "(an extension) and reload the model")
    if tome:  # the WebUI's own patch (a generation that used it, an extension): the LoRA must not train through it
        sd_models.apply_token_merging(host.sd_model, 0)
    networks = networks_module()
    if networks is not None:
        networks.load_networks([])
        with torch.no_grad():  # as at inference, where the WebUI does this itself
            for module in host.sd_model.modules():
                if getattr(module, "network_current_names", ()):
                    networks.network_apply_weights(module)  # no networks wanted: restores the backed-up weights
    hypernetworks, shared.loaded_hypernetworks = list(getattr(shared, "loaded_hypernetworks", [])), []
    try:
        with out_of_medvram(host.sd_model):
            yield
    finally:
        shared.loaded_hypernetworks = hypernetworks
        if tome:
            sd_models.apply_token_merging(host.sd_model, tome)
        devices.torch_gc()


def networks_module():
    """The built-in Lora extension's `networks` module, once its scripts are loaded (None without it)."""
    import sys

    return sys.modules.get("networks")
