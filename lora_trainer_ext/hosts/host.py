"""What training needs from the program that holds the model: the WebUI's loaded model
(`webui/host.py`) or a checkpoint loaded headless (`standalone.py`). The trainer talks only to
this interface, so the same loop runs in the WebUI, in the CLI and in the tests.

Conventions: images are float tensors in [-1, 1], NCHW; latents are already multiplied by the VAE's
scale factor; timesteps are integer tensors in [0, len(alphas_cumprod)); a host's modules stay where
the host put them (device and dtype) and the trainer restores anything it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the kinds and the protocol are read by code that must not load torch
    import torch

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"


@dataclass
class SizeInfo:
    """SDXL's size conditioning for one training image (pixels, as (height, width) pairs)."""

    original: tuple[int, int]  # the image's size before resizing to its bucket
    crop_top_left: tuple[int, int]  # (top, left) of the crop inside the resized image
    target: tuple[int, int]  # the bucket's size


class Host(Protocol):
    kind: str  # SD1, SD2 or SDXL
    parameterization: str  # "eps" or "v"
    model_name: str  # the checkpoint's file name (for ss_sd_model_name and the Lora card)
    model_hash: str  # the WebUI's short hash of the checkpoint file, "" when unknown
    model_sha256: str  # the file's whole sha256 (kohya's ss_new_sd_model_hash), "" when unknown
    model_legacy_hash: str  # the WebUI's old 8-digit hash (kohya's ss_sd_model_hash), "" when unknown
    device: torch.device
    dtype: torch.dtype  # the dtype of the frozen UNet weights
    unet: torch.nn.Module  # the ldm/sgm `UNetModel` (`model.diffusion_model`): names follow ldm
    text_encoders: list[torch.nn.Module]  # HF CLIPTextModel(s) that a text-encoder LoRA may wrap ([] if none)
    vae: torch.nn.Module  # used by encode_images; the trainer moves it off the GPU once latents are cached
    alphas_cumprod: torch.Tensor  # float32 [T], the training noise schedule (the original, not the halved one)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (scaled) of images in [-1, 1]; no gradients."""

    def conditioning(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> Any:
        """The UNet's conditioning for `captions` through the host's own prompt path (75-token chunks,
        clip skip): a tensor for SD1/2, sgm's {"crossattn", "vector"} dict for SDXL (`sizes` given).
        Runs with gradients when a text-encoder LoRA is being trained."""

    def apply_model(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The UNet's prediction (eps or v, per `parameterization`) for noisy `latents`."""


def crossattn(cond):
    """The cross-attention context of a host's conditioning (SDXL's is a dict that also holds "vector")."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


def gpu_memory(device=None) -> tuple[float, float] | None:
    """(free, total) GiB of the CUDA `device` (default: the current one), None when training would not
    run on a CUDA GPU. The one place LoRA Maker asks: the plan, the presets and the trainer's messages."""
    import torch

    if (device is not None and torch.device(device).type != "cuda") or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free / 2**30, total / 2**30
