"""The LoRA file itself: kohya's key names, tensors and metadata, so that the WebUI, ComfyUI, diffusers
and sd-scripts load what we train (spec: shared/reference/lora-format-and-training.md §1.3-1.6, §5).

The network wraps the host's ldm/sgm `UNetModel` and HF CLIP text encoders and names its modules the
kohya way from their dotted paths (`lora_name`). Before saving, SD1/SD2 UNet names are rewritten to the
diffusers paths that sd-scripts writes (the only form diffusers loads; the WebUI and ComfyUI load it
too); SDXL keeps its sgm paths, which is what sd-scripts writes for SDXL. The mapping works on the
dotted paths the network gives (`module_paths`), never by guessing where `_` was a `.`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from ..errors import LoraMakerError
from ..files import read_json, write_bytes, write_json
from ..hosts.host import SD1, SD2, SDXL

UNET_PREFIX = "lora_unet"
TE_PREFIXES = {SD1: ("lora_te",), SD2: ("lora_te",), SDXL: ("lora_te1", "lora_te2")}
TENSOR_PARAMS = ("lora_down.weight", "lora_up.weight", "alpha")  # all that every loader reads (§2.4)
CARD_VERSIONS = {SD1: "SD1", SD2: "SD2", SDXL: "SDXL"}  # the WebUI card's "sd version" values


def lora_name(prefix: str, module_path: str) -> str:
    """kohya's name of the module at dotted `module_path` under `prefix` (`lora_unet`, `lora_te`, ...)."""
    return f"{prefix}_{module_path}".replace(".", "_")


# --- names -----------------------------------------------------------------------------------------

# Linear/Conv2d layers inside a transformer block; identical in ldm, sgm and diffusers.
_TRANSFORMER_LAYER = re.compile(
    r"proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
)
_RESNET_LAYERS = {  # ldm ResBlock -> diffusers ResnetBlock2D (the Linear/Conv2d ones; norms are no LoRA target)
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP_LAYERS = {  # outside the blocks (LyCORIS' "full" preset wraps these; kohya does not)
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_MIDDLE = re.compile(r"middle_block\.([012])\.(.+)")
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def ldm_to_diffusers_path(path: str) -> str:
    """The diffusers path of the UNet layer at ldm/sgm `path` (§1.6; 2 res blocks per level, as in every
    SD1/SD2/SDXL UNet). Raises `LoraMakerError` for a path that is not a LoRA-able UNet layer."""
    if path in _TOP_LAYERS:
        return _TOP_LAYERS[path]
    m = _MIDDLE.fullmatch(path)
    if m:
        index, rest = int(m[1]), m[2]
        if index == 1 and _TRANSFORMER_LAYER.fullmatch(rest):
            return f"mid_block.attentions.0.{rest}"
        if index in (0, 2) and rest in _RESNET_LAYERS:
            return f"mid_block.resnets.{index // 2}.{_RESNET_LAYERS[rest]}"
        raise _unknown(path)
    m = _BLOCK.fullmatch(path)
    if not m:
        raise _unknown(path)
    side, block, sub, rest = m[1], int(m[2]), int(m[3]), m[4]
    if side == "input_blocks":
        if block == 0:
            raise _unknown(path)
        level, j = divmod(block - 1, 3)  # per level: resnet+attn, resnet+attn, downsampler
        if j == 2:
            if sub == 0 and rest == "op":
                return f"down_blocks.{level}.downsamplers.0.conv"
        elif sub == 0 and rest in _RESNET_LAYERS:
            return f"down_blocks.{level}.resnets.{j}.{_RESNET_LAYERS[rest]}"
        elif sub == 1 and _TRANSFORMER_LAYER.fullmatch(rest):
            return f"down_blocks.{level}.attentions.{j}.{rest}"
        raise _unknown(path)
    level, j = divmod(block, 3)  # per level: three resnet(+attn) blocks, the last one ends in the upsampler
    if sub == 0 and rest in _RESNET_LAYERS:
        return f"up_blocks.{level}.resnets.{j}.{_RESNET_LAYERS[rest]}"
    if sub == 1 and _TRANSFORMER_LAYER.fullmatch(rest):
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    # The upsampler is child 1 of a level without attention (SD1/2's lowest level), else child 2.
    if j == 2 and sub in (1, 2) and rest == "conv":
        return f"up_blocks.{level}.upsamplers.0.conv"
    raise _unknown(path)


def _unknown(path: str) -> LoraMakerError:
    return LoraMakerError(
        f"The LoRA module at UNet path {path!r} has no name that the WebUI, ComfyUI and diffusers all load; "
        "this is a bug in LoRA Maker's network, please report it"
    )


def output_name_map(kind: str, module_paths: Mapping[str, str]) -> dict[str, str]:
    """{network module name: the name written to the file} for every module in `module_paths`
    ({kohya name built with `lora_name`: dotted path of the wrapped layer inside its model})."""
    if kind not in TE_PREFIXES:
        raise LoraMakerError(f"Unknown model kind {kind!r} (expected one of {SD1}, {SD2}, {SDXL})")
    out: dict[str, str] = {}
    for name, path in module_paths.items():
        prefix = _prefix_of(name, kind)
        if lora_name(prefix, path) != name:
            raise LoraMakerError(f"LoRA module {name!r} does not name the path {path!r}; this is a bug, please report it")
        if prefix == UNET_PREFIX:
            diffusers = ldm_to_diffusers_path(path)  # validates SDXL paths too (same block layout)
            out[name] = name if kind == SDXL else lora_name(UNET_PREFIX, diffusers)
        elif _CLIP_LAYER.fullmatch(path):
            out[name] = name  # HF CLIP paths are what every loader expects already
        else:
            raise LoraMakerError(
                f"The LoRA module at text-encoder path {path!r} is not one the WebUI can load "
                "(only CLIP attention q/k/v/out and MLP layers); this is a bug, please report it"
            )
    if len(set(out.values())) != len(out):
        raise LoraMakerError("Two LoRA modules map to the same file name; this is a bug, please report it")
    return out


def _prefix_of(name: str, kind: str) -> str:
    for prefix in (UNET_PREFIX, *TE_PREFIXES[kind]):
        if name.startswith(prefix + "_"):
            return prefix
    raise LoraMakerError(f"LoRA module {name!r} has no {kind} prefix ({UNET_PREFIX}_, {', '.join(TE_PREFIXES[kind])}_)")


def to_output_names(state_dict: Mapping[str, torch.Tensor], kind: str, module_paths: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The network's state dict (`<module name>.<param>` keys) with the module names the file uses."""
    return _rename(state_dict, output_name_map(kind, module_paths))


def from_output_names(state_dict: Mapping[str, torch.Tensor], kind: str, module_paths: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of `to_output_names`: a saved file's tensors keyed by the network's module names
    (to resume training). Raises `LoraMakerError` if the file holds a module the network lacks."""
    inverse = {file_name: name for name, file_name in output_name_map(kind, module_paths).items()}
    return _rename(state_dict, inverse, what="this network (was it trained with other settings or on another model type?)")


def _rename(state_dict: Mapping[str, torch.Tensor], names: Mapping[str, str], what: str = "module_paths") -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        name, _, param = key.partition(".")
        if name not in names:
            raise LoraMakerError(f"LoRA module {name!r} is not in {what}")
        out[f"{names[name]}.{param}"] = tensor
    return out


# --- metadata --------------------------------------------------------------------------------------


@dataclass
class NetworkInfo:
    """The network's shape as kohya's metadata describes it. LoCon when `conv_dim` is set."""

    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None


# Facts of the run accepted by `lora_metadata`, each written as `ss_<key>` the way sd-scripts writes it.
RUN_KEYS = (
    "output_name", "session_id", "training_started_at", "training_finished_at", "sd_model_name",
    "sd_model_hash", "new_sd_model_hash", "seed", "num_epochs", "epoch", "steps", "max_train_steps",
    "num_batches_per_epoch", "num_train_images", "batch_size_per_device", "total_batch_size",
    "gradient_accumulation_steps", "learning_rate", "unet_lr", "text_encoder_lr", "optimizer",
    "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "mixed_precision", "gradient_checkpointing",
    "cache_latents", "clip_skip", "max_token_length", "min_snr_gamma", "noise_offset",
    "multires_noise_iterations", "multires_noise_discount", "keep_tokens", "flip_aug", "shuffle_caption",
    "caption_dropout_rate", "caption_tag_dropout_rate", "enable_bucket", "min_bucket_reso",
    "max_bucket_reso", "bucket_no_upscale", "bucket_info", "dataset_dirs", "tag_frequency", "resolution",
    "training_comment", "prior_loss_weight", "zero_terminal_snr", "ip_noise_gamma",
    "scale_v_pred_loss_like_noise_pred",
    # modelspec only (not ss_): the activation tags and free text
    "trigger_phrase", "description",
)
_MODELSPEC_ONLY = {"trigger_phrase", "description"}


def lora_metadata(kind: str, parameterization: str, network: NetworkInfo, run: Mapping[str, Any]) -> dict[str, str]:
    """The header metadata (all strings) sd-scripts writes, from `run` (keys in `RUN_KEYS`; None or
    absent are left out), plus the modelspec block. `sshs_*` hashes are added by `save_lora`."""
    unknown = sorted(set(run) - set(RUN_KEYS))
    if unknown:
        raise LoraMakerError(f"Unknown training facts for the LoRA metadata: {', '.join(unknown)}")
    if parameterization not in ("eps", "v"):
        raise LoraMakerError(f"Unknown parameterization {parameterization!r} (expected 'eps' or 'v')")
    if kind not in TE_PREFIXES:
        raise LoraMakerError(f"Unknown model kind {kind!r} (expected one of {SD1}, {SD2}, {SDXL})")
    v_pred = parameterization == "v"
    meta: dict[str, str] = {}
    for key, value in run.items():
        if value is None or key in _MODELSPEC_ONLY:
            continue
        if key == "resolution":
            value = str(_size(value))  # sd-scripts writes the parsed tuple: "(512, 512)"
        meta[f"ss_{key}"] = _text(value)

    # kohya's native LoCon (networks.lora + conv_dim): loads in the WebUI without extensions and in
    # sd-scripts without LyCORIS; the loaders pick the module type from the tensor names anyway.
    meta["ss_network_module"] = "networks.lora"
    meta["ss_network_dim"] = str(int(network.dim))
    meta["ss_network_alpha"] = str(float(network.alpha))
    if network.dropout:
        meta["ss_network_dropout"] = str(float(network.dropout))
    args = {}
    if network.conv_dim:  # sd-scripts keeps network_args as the strings of `key=value`
        args["conv_dim"] = str(int(network.conv_dim))
        args["conv_alpha"] = str(float(network.conv_alpha if network.conv_alpha is not None else 1.0))
    if args:
        meta["ss_network_args"] = json.dumps(args)
    meta["ss_v2"] = str(kind == SD2)
    meta["ss_base_model_version"] = (
        "sdxl_base_v1-0" if kind == SDXL else ("sd_v2" if kind == SD2 else "sd_v1") + ("_v" if v_pred else "")
    )

    meta.update(_modelspec(kind, v_pred, run))
    return meta


def _modelspec(kind: str, v_pred: bool, run: Mapping[str, Any]) -> dict[str, str]:
    """Stability AI's model spec 1.0.1, as sd-scripts' sai_model_spec.py fills it for a LoRA."""
    if kind == SDXL:
        arch, impl, default_size = "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", 1024
    elif kind == SD2:
        arch, impl = ("stable-diffusion-v2-768-v", "diffusers") if v_pred else ("stable-diffusion-v2-512", "diffusers")
        default_size = 768 if v_pred else 512
    else:
        arch, impl, default_size = "stable-diffusion-v1", "diffusers", 512
    width, height = _size(run.get("resolution") or default_size)
    stamp = float(run.get("training_finished_at") or time.time())
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": str(run.get("output_name") or f"LoRA@{datetime.datetime.fromtimestamp(stamp):%Y-%m-%d-%H-%M-%S}"),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.implementation_version": f"lora-maker/{__version__}",  # sd-scripts writes sd-scripts/<commit>
    }
    if run.get("clip_skip") is not None and kind != SDXL:  # SDXL's encoders use their config's layers
        spec["modelspec.encoder_layer"] = str(run["clip_skip"])
    if run.get("trigger_phrase"):
        tags = run["trigger_phrase"]
        spec["modelspec.trigger_phrase"] = tags if isinstance(tags, str) else ", ".join(tags)
    if run.get("description"):
        spec["modelspec.description"] = str(run["description"])
    return spec


def _size(value) -> tuple[int, int]:
    """(width, height) from an int side or a (width, height) pair."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    width, height = value
    return int(width), int(height)


def _text(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# --- the file --------------------------------------------------------------------------------------


def save_lora(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Write `state_dict` (file names, see `to_output_names`) and `metadata` atomically as a
    .safetensors file in `dtype`, adding sd-scripts' `sshs_model_hash` / `sshs_legacy_hash`.
    Returns the metadata written."""
    import safetensors.torch

    tensors = _checked_tensors(state_dict, dtype)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise LoraMakerError(f"LoRA metadata {key!r} must be a string, not {type(value).__name__}")
    # sd-scripts hashes a serialisation holding only the ss_* keys (train_util.precalculate_safetensors_hashes).
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    hashed = safetensors.torch.save(tensors, training_only or None)
    final = {**metadata, "sshs_model_hash": tensor_data_hash(hashed), "sshs_legacy_hash": legacy_hash(hashed)}
    write_bytes(Path(path), safetensors.torch.save(tensors, final))
    return final


def _checked_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, param = key.partition(".")
        if param not in TENSOR_PARAMS:
            raise LoraMakerError(f"LoRA tensor {key!r} is not one of {', '.join(TENSOR_PARAMS)}; loaders would reject the file")
        modules.setdefault(name, {})[param] = tensor
    if not modules:
        raise LoraMakerError("The LoRA has no modules to save")
    out = {}
    for name, params in modules.items():
        missing = [p for p in TENSOR_PARAMS if p not in params]
        if missing:
            raise LoraMakerError(f"LoRA module {name!r} lacks {', '.join(missing)}")
        down, up, alpha = (params[p] for p in TENSOR_PARAMS)
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or alpha.numel() != 1:
            raise LoraMakerError(
                f"LoRA module {name!r} has inconsistent shapes: down {tuple(down.shape)}, up {tuple(up.shape)}, alpha {tuple(alpha.shape)}"
            )
        for param, tensor in params.items():
            converted = tensor.detach().to("cpu", dtype).contiguous()
            if param == "alpha":
                converted = converted.reshape(())  # sd-scripts stores a 0-dim tensor
            if not torch.isfinite(converted).all():
                raise LoraMakerError(
                    f"LoRA module {name!r} holds NaN/inf values in {dtype} (training diverged or the values are out of "
                    "range): lower the learning rate, or save in bfloat16/float32"
                )
            out[f"{name}.{param}"] = converted
    return out


def tensor_data_hash(data: bytes) -> str:
    """sha256 of the tensor-data section of a safetensors serialisation: sd-scripts' `sshs_model_hash`
    and the WebUI's "addnet" hash of the file (it does not depend on the header)."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def legacy_hash(data: bytes) -> str:
    """The old 8-hex WebUI hash (sha256 of the 64 KiB at offset 1 MiB) of serialised bytes: sd-scripts'
    `sshs_legacy_hash` of the ss_-only serialisation."""
    return hashlib.sha256(memoryview(data)[_LEGACY_WINDOW]).hexdigest()[:8]


def model_file_hash(path: Path) -> str:
    """The same old hash of a checkpoint file (the WebUI's `sd_models.model_hash`, what sd-scripts
    writes as `ss_sd_model_hash`), reading only its 64 KiB window."""
    with open(path, "rb") as f:
        f.seek(_LEGACY_WINDOW.start)
        return hashlib.sha256(f.read(_LEGACY_WINDOW.stop - _LEGACY_WINDOW.start)).hexdigest()[:8]


_LEGACY_WINDOW = slice(0x100000, 0x110000)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a .safetensors LoRA file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise LoraMakerError(f"LoRA file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraMakerError(f"Cannot read the LoRA file {path} ({e}); it is damaged or not a .safetensors file") from None
    return tensors, metadata


def card_path(lora_path: Path) -> Path:
    """The sidecar `<name>.json` the WebUI reads for a Lora card."""
    return Path(lora_path).with_suffix(".json")


def write_card(
    lora_path: Path,
    activation_text: str,
    preferred_weight: float,
    sd_version: str,
    notes: str | None = None,
    description: str | None = None,
) -> Path:
    """Write the WebUI card of the LoRA at `lora_path`: activation text, preferred weight (0 = the
    WebUI's default multiplier), model version (`sd1`/`sd2`/`sdxl`). Keys the user set in the WebUI
    (notes, description, negative text...) are kept unless given here."""
    if sd_version not in CARD_VERSIONS:
        raise LoraMakerError(f"Unknown model kind {sd_version!r} (expected one of {SD1}, {SD2}, {SDXL})")
    path = card_path(lora_path)
    try:
        card = read_json(path, {})
    except (ValueError, OSError):
        card = {}  # an unreadable card is replaced, as the WebUI would ignore it
    if not isinstance(card, dict):
        card = {}
    card.update(
        {
            "activation text": activation_text,
            "preferred weight": float(preferred_weight),
            "sd version": CARD_VERSIONS[sd_version],
        }
    )
    for key, value in (("notes", notes), ("description", description)):
        if value is not None:
            card[key] = value
        card.setdefault(key, "")
    write_json(path, card)
    return path
