"""The trainable network: LoRA or LoCon modules (lycoris-lora) attached to the host's ldm/sgm UNet and,
when asked, its CLIP text encoder(s), named the way kohya's sd-scripts names them.

kohya wraps every Linear/Conv2d inside chosen container classes: transformer blocks for LoRA, plus
ResNet blocks and down/upsamplers for LoCon, and CLIP attention/MLP blocks in the text encoder. The
ldm and sgm UNets call those containers SpatialTransformer, ResBlock, Downsample and Upsample; with
the UNet itself as the root, lycoris then produces kohya's names (`lora_unet_input_blocks_1_1_...`).

Attaching patches the wrapped layers' `forward`; detaching leaves each layer exactly as it was (no
stray attributes), because the host's model lives on after training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import LoraMakerError
from ..hosts.host import SD2, Host
from .open_clip_lora import OpenClipLoras, is_open_clip

ALGOS = ("lora", "locon")
UNET_TARGETS = {
    "lora": ["SpatialTransformer"],
    "locon": ["SpatialTransformer", "ResBlock", "Downsample", "Upsample"],
}
TEXT_ENCODER_TARGETS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
_LYCORIS_ATTRIBUTES = ("forward", "_lycoris_original_forward", "_lycoris_wrappers")


@dataclass
class NetworkConfig:
    algo: str = "lora"  # "lora" (transformer blocks) or "locon" (also ResNet and resampling convs)
    dim: int = 16  # rank of Linear and 1x1 conv modules
    alpha: float = 8.0  # scale = alpha / dim
    conv_dim: int = 8  # rank of 3x3 conv modules (LoCon)
    conv_alpha: float = 1.0
    dropout: float = 0.0  # dropout on each module's output while training


def require_lycoris() -> None:
    """LoraMakerError with the fix when lycoris-lora (the LoRA/LoCon modules) is not installed."""
    import importlib.util

    if importlib.util.find_spec("lycoris") is None:
        raise LoraMakerError("training and grids need lycoris-lora, which is not installed: restart the WebUI so "
                             "LoRA Maker's install.py adds it, or run: pip install 'lycoris-lora<4'")


@contextlib.contextmanager
def _lycoris_preset(**attributes):
    """lycoris reads its targets from class attributes of LycorisNetwork (not of a subclass), so set
    them for one construction and put the old values back: other lycoris users keep theirs."""
    require_lycoris()
    from lycoris.wrapper import LycorisNetwork

    names = {"target_module": "TARGET_REPLACE_MODULE", "target_name": "TARGET_REPLACE_NAME",
             "lora_prefix": "LORA_PREFIX", "enable_conv": "ENABLE_CONV", "module_algo_map": "MODULE_ALGO_MAP",
             "name_algo_map": "NAME_ALGO_MAP", "exclude_name": "TARGET_EXCLUDE_NAME"}
    saved = {attr: getattr(LycorisNetwork, attr) for attr in names.values()}
    try:
        LycorisNetwork.apply_preset({"module_algo_map": {}, "name_algo_map": {}, "exclude_name": [], **attributes})
        yield LycorisNetwork
    finally:
        for attr, value in saved.items():
            setattr(LycorisNetwork, attr, value)


@contextlib.contextmanager
def _quiet():
    """lycoris logs every construction at INFO level; the user sees our summary instead."""
    import logging

    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _layer(path: str) -> int:
    """The encoder layer of an HF CLIP path ("text_model.encoder.layers.11.mlp.fc1" -> 11)."""
    return int(path.split(".layers.")[1].split(".")[0])


class _Part:
    """One network over one root module (the UNet, or one text encoder): lycoris' for ldm/sgm and HF
    CLIP modules, `open_clip_lora`'s (with lycoris' interface) for an OpenCLIP text tower."""

    def __init__(self, prefix: str, root: torch.nn.Module, targets: list[str], config: NetworkConfig, conv: bool,
                 unused_last_blocks: int = 0):
        self.prefix = prefix
        self.root = root
        self._saved_attributes: list[tuple[torch.nn.Module, dict]] = []
        self.attached = False
        if is_open_clip(root):
            self.lycoris = OpenClipLoras(prefix, root, config.dim, config.alpha, unused_last_blocks)
            self.paths = self.lycoris.paths
            return
        with _lycoris_preset(target_module=targets, target_name=[], lora_prefix=prefix, enable_conv=conv) as cls, _quiet():
            self.lycoris = cls(
                root,
                multiplier=1.0,
                lora_dim=config.dim,
                alpha=config.alpha,
                conv_lora_dim=config.conv_dim if conv else 0,
                conv_alpha=config.conv_alpha,
                dropout=config.dropout,
                network_module="locon",  # lycoris' LoRA/LoCon module; which layers it gets decides LoRA vs LoCon
                bypass_mode=True,  # y = org(x) + up(down(x)) * scale: rank-r matmuls, not a full delta weight
            )
        if not self.lycoris.loras:
            raise LoraMakerError(f"no layers to train in {type(root).__name__} ({prefix}): is this a Stable Diffusion model?")
        self.paths = self._module_paths()
        if unused_last_blocks:  # an HF CLIP text model: leave out its last encoder layers
            kept = root.config.num_hidden_layers - unused_last_blocks
            self.lycoris.loras = [lora for lora in self.lycoris.loras if _layer(self.paths[lora.lora_name]) < kept]
            self.paths = {lora.lora_name: self.paths[lora.lora_name] for lora in self.lycoris.loras}
        for lora in self.lycoris.loras:  # lycoris registers them only when attaching; we need them before
            self.lycoris.add_module(lora.lora_name, lora)

    def _module_paths(self) -> dict[str, str]:
        """lora name -> dotted path of the wrapped layer inside the root (for renaming on save)."""
        by_id = {id(module): path for path, module in self.root.named_modules()}
        return {lora.lora_name: by_id[id(lora.org_module[0])] for lora in self.lycoris.loras}

    def attach(self) -> None:
        self._saved_attributes = [  # what lycoris patches on the layers it wraps (none on OpenCLIP parts)
            (module, {k: module.__dict__[k] for k in _LYCORIS_ATTRIBUTES if k in module.__dict__})
            for module in (lora.org_module[0] for lora in self.lycoris.loras if hasattr(lora, "org_module"))
        ]
        self.attached = True
        self.lycoris.apply_to()

    def detach(self) -> None:
        if not self.attached:
            return
        self.lycoris.restore()
        for module, saved in self._saved_attributes:
            for key in _LYCORIS_ATTRIBUTES:
                module.__dict__.pop(key, None)
            module.__dict__.update(saved)
        self._saved_attributes = []
        self.attached = False


class Network:
    """LoRA/LoCon modules for a host: the UNet always, text encoders when `train_text_encoder`."""

    def __init__(self, host: Host, config: NetworkConfig, train_text_encoder: bool = False):
        if config.algo not in ALGOS:
            raise LoraMakerError(f"unknown network {config.algo!r}: choose one of {', '.join(ALGOS)}")
        if config.dim < 1 or (config.algo == "locon" and config.conv_dim < 1):
            raise LoraMakerError(f"the network rank must be at least 1 (dim {config.dim}, conv_dim {config.conv_dim})")
        self.config = config
        locon = config.algo == "locon"
        self.parts = [_Part("lora_unet", host.unet, UNET_TARGETS[config.algo], config, conv=locon)]
        if train_text_encoder:
            if not host.text_encoders:
                raise LoraMakerError("this model offers no trainable text encoder: set text_encoder_lr=0")
            many = len(host.text_encoders) > 1
            # SD2 conditions on OpenCLIP's penultimate layer: the last never gets a gradient, and kohya's SD2 text
            # encoder has no such layer (23 of 24), where its keys would be unexpected. SDXL's second encoder
            # needs it for the pooled output.
            unused = 1 if host.kind == SD2 else 0
            for i, encoder in enumerate(host.text_encoders, 1):
                prefix = f"lora_te{i}" if many else "lora_te"
                self.parts.append(_Part(prefix, encoder, TEXT_ENCODER_TARGETS, config, conv=False,
                                        unused_last_blocks=unused))
        device = host.device
        for part in self.parts:
            part.lycoris.to(device=device, dtype=torch.float32)  # trained in fp32, under autocast
            part.lycoris.requires_grad_(True)
        self.attached = False

    @property
    def unet(self) -> _Part:
        return self.parts[0]

    @property
    def text_encoder_parts(self) -> list[_Part]:
        return self.parts[1:]

    def module_count(self) -> int:
        return sum(len(part.lycoris.loras) for part in self.parts)

    def attach(self) -> None:
        if not self.attached:
            self.attached = True  # so that detach() undoes a partial attach too
            for part in self.parts:
                part.attach()

    def detach(self) -> None:
        if self.attached:
            for part in reversed(self.parts):
                part.detach()
            self.attached = False

    def parameter_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        groups = [{"params": list(self.unet.lycoris.parameters()), "lr": unet_lr, "name": "unet"}]
        te_params = [p for part in self.text_encoder_parts for p in part.lycoris.parameters()]
        if te_params:
            groups.append({"params": te_params, "lr": text_encoder_lr, "name": "text_encoder"})
        return groups

    def parameters(self):
        for part in self.parts:
            yield from part.lycoris.parameters()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.lycoris.train(mode)

    def module_paths(self) -> dict[str, str]:
        """{kohya module name: dotted path of the wrapped layer in its model}, for `lora_file`."""
        return {name: path for part in self.parts for name, path in part.paths.items()}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """`<module name>.lora_down.weight` / `.lora_up.weight` / `.alpha`: detached fp32 CPU copies
        of what a LoRA file holds (`lora_file.to_output_names` renames them for saving)."""
        out = {}
        for part in self.parts:
            for lora in part.lycoris.loras:
                tensors = lora.custom_state_dict()
                for key in ("lora_down.weight", "lora_up.weight", "alpha"):
                    out[f"{lora.lora_name}.{key}"] = tensors[key].detach().float().cpu().clone()
        return out

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the weights from `lora_state_dict` form (a saved file's tensors renamed back with
        `lora_file.from_output_names`); every module of the network must be there."""
        for part in self.parts:
            names = {lora.lora_name for lora in part.lycoris.loras}
            mine = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in names}
            if {k.split(".", 1)[0] for k in mine} != names:
                raise LoraMakerError("the LoRA file does not fit this network (different network type, rank or model)")
            part.lycoris.load_state_dict(mine, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state for resuming (lycoris' own names)."""
        return {f"{part.prefix}/{k}": v for part in self.parts for k, v in part.lycoris.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for part in self.parts:
            mine = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == part.prefix}
            try:
                missing, unexpected = part.lycoris.load_state_dict(mine, strict=False)
            except RuntimeError:  # shapes differ: another rank
                missing, unexpected = ["shapes"], []
            if [k for k in missing if not k.endswith("scalar")] or unexpected:
                raise LoraMakerError(
                    "the saved training state does not fit this network (different network type, rank or model): "
                    "start a new run instead of resuming"
                )
