"""A checkpoint file loaded headless as a training `Host`: for the CLI, the standalone app, the
benchmark and the tests. `checkpoint.py` reads the file and its config, `models.py` builds the modules;
this is the host over them. Without a yaml, an SD2 checkpoint's parameterization is guessed by running
the UNet, as WebUI 1.10.1 does.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraMakerError
from .checkpoint import (
    KIND_NAMES,
    UNET,
    V_PRED_MARKER,
    VAE,
    config_kind,
    detect_kind,
    model_spec,
    read_config,
    read_state_dict,
    standard_config,
    substate,
)
from .host import SD1, SD2, SDXL, SizeInfo
from .models import (
    build_text_encoder,
    build_unet,
    build_vae,
    load_tokenizer,
    load_weights,
    make_alphas_cumprod,
    require_ldm,
    swap_classes,
)
from .prompt import ChunkedTokenizer, ClipReader


def size_embedding(sizes: list[SizeInfo], dim: int) -> torch.Tensor:
    """SDXL's size vector: original (h, w), crop (top, left), target (h, w), each int as a `dim`-wide
    sinusoidal timestep embedding, concatenated in that order -> [B, 6*dim] (sgm ConcatTimestepEmbedderND)."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    values = torch.tensor([[*s.original, *s.crop_top_left, *s.target] for s in sizes], dtype=torch.float32)
    return timestep_embedding(values.flatten(), dim).reshape(len(sizes), 6 * dim)


class StandaloneHost:
    """A checkpoint's models as a training `Host` (see host.py). All weights are frozen (requires_grad
    False) and in eval mode, as a loaded WebUI model is used for inference; the trainer records and
    restores whatever it changes. `clip_skip` (SD1 only, as in the WebUI) may be set at any time."""

    def __init__(self, *, kind, parameterization, path: Path, unet, vae, text_encoders, readers, tokenizer,
                 alphas_cumprod, scale_factor, size_embed_dim, device, dtype, clip_skip=1, config_path=None):
        self.kind = kind
        self.parameterization = parameterization
        self.path = path
        self.config_path = config_path
        self.model_name = path.name
        self.unet, self.vae, self.text_encoders = unet, vae, text_encoders
        self.readers = readers
        self.tokenizer = tokenizer  # ChunkedTokenizer
        self.alphas_cumprod = alphas_cumprod
        self.scale_factor = scale_factor
        self.size_embed_dim = size_embed_dim
        self.device, self.dtype = device, dtype
        self.vae_dtype = next(vae.parameters()).dtype
        self.clip_skip = clip_skip
        self._sha256: str | None = None

    @property
    def model_sha256(self) -> str:
        """The file's sha256 (read once, on demand: a few seconds for a GB-sized checkpoint)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    @property
    def model_hash(self) -> str:
        """The WebUI's short hash: the first 10 hex digits of the file's sha256."""
        return self.model_sha256[:10]

    @property
    def model_legacy_hash(self) -> str:
        """The WebUI's old 8-digit hash (its sha256 of a 64 KiB window)."""
        from ..training.lora_file import model_file_hash

        return model_file_hash(self.path)

    def _autocast(self):
        """Frozen weights in half precision run under autocast, as the WebUI runs its model."""
        if self.dtype == torch.float32 or torch.is_autocast_enabled():
            return contextlib.nullcontext()  # the trainer's autocast (fp16 or bf16) decides
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):  # the VAE keeps its own (fp32) precision
            posterior = self.vae.encode(images.to(self.device, self.vae_dtype))
            return (posterior.sample() * self.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped, float32) of scaled latents: the inverse of `encode_images`,
        as the WebUI's `decode_first_stage` (for rendering grids headless)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.vae.decode(latents.to(self.device, self.vae_dtype) / self.scale_factor).float()

    def conditioning(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> Any:
        if self.kind == SD1:
            layers = self.text_encoders[0].config.num_hidden_layers
            if not 1 <= int(self.clip_skip) <= layers:
                raise LoraMakerError(f"clip skip must be 1 to {layers} for this model, not {self.clip_skip}")
            self.readers[0].layer = -int(self.clip_skip)
        captions = list(captions)
        chunks = self.tokenizer.chunks(captions)
        eos, weights = self.tokenizer.eos, self.tokenizer.weights(chunks, self.device)
        with self._autocast():
            outputs = [reader.encode(self.tokenizer.ids(chunks, reader.pad_id(eos), self.device), eos, weights)
                       for reader in self.readers]
        if self.kind != SDXL:
            return outputs[0][0]
        if sizes is None:  # the WebUI's default for a prompt without a size: 1024x1024, no crop
            sizes = [SizeInfo((1024, 1024), (0, 0), (1024, 1024))] * len(captions)
        if len(sizes) != len(captions):
            raise ValueError(f"{len(sizes)} sizes for {len(captions)} captions")
        pooled = outputs[1][1]
        crossattn = torch.cat([outputs[0][0], outputs[1][0].to(outputs[0][0].dtype)], dim=-1)
        sizes_vector = size_embedding(sizes, self.size_embed_dim).to(pooled.device, pooled.dtype)
        vector = torch.cat([pooled, sizes_vector], dim=1)
        return {"crossattn": crossattn, "vector": vector}

    def apply_model(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        with self._autocast():
            x = latents.to(self.dtype)
            if self.kind == SDXL:
                context, y = cond["crossattn"].to(self.dtype), cond["vector"].to(self.dtype)
                return self.unet(x, timesteps, context=context, y=y)
            return self.unet(x, timesteps, context=cond.to(self.dtype))


@torch.no_grad()
def guess_v_prediction(unet: torch.nn.Module, last_timestep: int = 999) -> bool:
    """WebUI 1.10.1's test for an SD2 checkpoint without a yaml: at the last timestep, a v model's output
    for a flat 0.5 input sits far below the input, an eps model's near it."""
    param = next(unet.parameters())
    context_dim = next(m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    x = torch.full((1, unet.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, context_dim), 0.5, device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([last_timestep], device=param.device), context=context)
    return (out.float() - x.float()).mean().item() < -1


def load_checkpoint(path, config=None, device="cpu", dtype=torch.float32, *, clip_skip: int = 1,
                    attention: str = "sdp") -> StandaloneHost:
    """Load an SD 1.x/2.x/XL checkpoint (.safetensors, or .ckpt weights-only) as a StandaloneHost.

    `config`: the WebUI model config yaml (default: `<checkpoint>.yaml` beside it, else the standard
    config of the detected kind). UNet and text encoders are put in `dtype` on `device`; the VAE stays
    float32. `attention`: "sdp" (torch's fused attention) or "ldm" (ldm's own einsum attention)."""
    if attention not in ("sdp", "ldm"):
        raise ValueError(f"attention must be 'sdp' or 'ldm', not {attention!r}")
    require_ldm()
    path = Path(path)
    if path.is_dir():
        raise LoraMakerError(f"{path} is a folder: give a checkpoint file (.safetensors or .ckpt) in the WebUI's "
                             f"layout; diffusers folders are not supported")
    if not path.is_file():
        raise LoraMakerError(f"Checkpoint not found: {path}")
    device, name = torch.device(device), path.name
    state = read_state_dict(path)
    kind = detect_kind(state.keys(), name)
    config_path = Path(config) if config else path.with_suffix(".yaml")
    if config and not config_path.is_file():
        raise LoraMakerError(f"Model config not found: {config_path}")
    if config_path.is_file():
        raw = read_config(config_path)
        if config_kind(raw) != kind:
            raise LoraMakerError(f"{config_path.name} is a {KIND_NAMES[config_kind(raw)]} config but {name} "
                                 f"is a {KIND_NAMES[kind]} checkpoint")
        spec = model_spec(kind, raw, config_path.parent)
    else:
        config_path = None
        spec = model_spec(kind, standard_config(kind, state), path.parent)
    if int(spec.unet.get("in_channels", 4)) != 4:
        raise LoraMakerError(f"{name} is an inpainting or instruct model (UNet input of "
                             f"{spec.unet['in_channels']} channels); train on a base model instead")
    tokenizer = ChunkedTokenizer(load_tokenizer(spec, path))

    with torch.device("meta"):
        unet = build_unet(spec.unet)
        vae = build_vae(spec.vae)
    load_weights(unet, substate(state, UNET), "UNet", name)
    # some converted checkpoints store the VAE's 1x1 attention convs as linear weights
    vae_state = {k: (v[..., None, None] if v.ndim == 2 and ".attn_1." in k else v)
                 for k, v in substate(state, VAE).items() if not k.startswith("loss.")}
    load_weights(vae, vae_state, "VAE", name)
    encoders = [build_text_encoder(state, s, name, tokenizer.bos, tokenizer.eos) for s in spec.text]
    # the marker wins over an eps config: the WebUI's default SDXL yaml says eps for every SDXL model
    parameterization = "v" if V_PRED_MARKER in state else spec.parameterization
    del state

    swap_classes(unet, "norm")
    if attention == "sdp":
        swap_classes(unet, "sdp")
        swap_classes(vae, "sdp")
    for module, module_dtype in [(unet, dtype), (vae, torch.float32)] + [(te, dtype) for te in encoders]:
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    unet.dtype = dtype  # ldm's UNet casts its input to this
    readers = [ClipReader(te, s.layer, s.final_norm, s.pad, s.pooled) for te, s in zip(encoders, spec.text)]
    host = StandaloneHost(kind=kind, parameterization=parameterization or "eps", path=path, unet=unet,
                          vae=vae, text_encoders=encoders, readers=readers, tokenizer=tokenizer,
                          alphas_cumprod=make_alphas_cumprod(spec.schedule), scale_factor=spec.scale_factor,
                          size_embed_dim=spec.size_embed_dim, device=device, dtype=dtype, clip_skip=clip_skip,
                          config_path=config_path)
    if parameterization is None and kind == SD2:
        with host._autocast():
            if guess_v_prediction(unet, len(host.alphas_cumprod) - 1):
                host.parameterization = "v"
    return host
