"""The modules of a checkpoint, built from its `checkpoint.ModelSpec`: the UNet as ldm's `UNetModel`
(SDXL's sgm UNet has the same module names, so the sgm-only options are assembled here from ldm's
parts), the VAE as ldm's `AutoencoderKL`, and the text encoders as HF `transformers` CLIP models (SD2's
and SDXL's OpenCLIP weights converted by `openclip_to_hf`), with their tokenizer. Without a `tokenizer`
entry in the yaml the folder `tokenizer/` beside the checkpoint is used, else the HF cache's
openai/clip-vit-large-patch14 (offline).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LoraMakerError
from .checkpoint import ModelSpec, TextSpec, substate


@contextlib.contextmanager
def _quiet():
    """ldm prints a line per attention layer it builds."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _unet_levels(unet) -> list[tuple[torch.nn.Module, int]]:
    """(block, level) of every input and output block of an ldm UNetModel that may hold attention."""
    last = len(unet.channel_mult) - 1
    pairs, i = [], 1  # input_blocks[0] is the stem conv
    for level in range(last + 1):
        for _ in range(unet.num_res_blocks[level]):
            pairs.append((unet.input_blocks[i], level))
            i += 1
        i += level != last  # the downsample block
    outputs = [level for level in range(last, -1, -1) for _ in range(unet.num_res_blocks[level] + 1)]
    return pairs + list(zip(unet.output_blocks, outputs))


def _named_as(cls: type, base: type) -> type:
    """Our subclasses of ldm modules keep ldm's class name: LyCORIS and the WebUI pick modules by it."""
    cls.__name__, cls.__qualname__ = base.__name__, base.__qualname__
    return cls


@functools.lru_cache(maxsize=None)
def _deep_transformer_class():
    from ldm.modules.attention import SpatialTransformer

    class DeepSpatialTransformer(SpatialTransformer):
        """ldm's SpatialTransformer indexes the context per block, so more than one block fails with a
        single context; sgm's (SDXL's) gives every block the same context. Same modules and names."""

        def forward(self, x, context=None):
            if isinstance(context, list):
                context = context[0]
            b, c, h, w = x.shape
            x_in, x = x, self.norm(x)
            if not self.use_linear:
                x = self.proj_in(x)
            x = x.flatten(2).transpose(1, 2).contiguous()  # b c h w -> b (h w) c
            if self.use_linear:
                x = self.proj_in(x)
            for block in self.transformer_blocks:
                x = block(x, context=context)
            if self.use_linear:
                x = self.proj_out(x)
            x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
            if not self.use_linear:
                x = self.proj_out(x)
            return x + x_in

    return SpatialTransformer, _named_as(DeepSpatialTransformer, SpatialTransformer)


def _set_depth(block: torch.nn.Module, depth: int) -> None:
    """Rebuild the SpatialTransformer in `block` with `depth` transformer blocks (sgm's per-level depth)."""
    base, deep = _deep_transformer_class()
    for idx, layer in enumerate(block):
        if isinstance(layer, base) and len(layer.transformer_blocks) != depth:
            first = layer.transformer_blocks[0]
            heads = first.attn1.heads
            block[idx] = deep(
                layer.in_channels, heads, first.attn1.to_q.out_features // heads, depth=depth,
                context_dim=[first.attn2.to_k.in_features] * depth, disable_self_attn=first.disable_self_attn,
                use_linear=layer.use_linear, use_checkpoint=first.checkpoint)


def build_unet(params: dict) -> torch.nn.Module:
    """ldm's UNetModel from ldm or sgm `unet_config`/`network_config` params. sgm's extras (a
    "sequential" label embedding from `adm_in_channels`, per-level `transformer_depth`) are built from
    ldm's parts with sgm's module names, so SDXL weights load unchanged."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = dict(params)
    adm_in = params.pop("adm_in_channels", None)
    num_classes = params.pop("num_classes", None)
    depth = params.pop("transformer_depth", 1)
    depth_middle = params.pop("transformer_depth_middle", None)
    params.pop("spatial_transformer_attn_type", None)  # attention implementation, not architecture
    params["use_fp16"] = False  # the dtype is the host's, set after loading
    params.setdefault("image_size", 32)  # unused by the model; sgm's configs leave it out
    if num_classes is not None and num_classes != "sequential":
        raise LoraMakerError(f"Class-conditional UNets (num_classes={num_classes!r}) are not supported")
    for key in ("channel_mult", "attention_resolutions", "num_res_blocks"):
        if isinstance(params.get(key), (list, tuple)):
            params[key] = list(params[key])
    levels = len(params.get("channel_mult", (1, 2, 4, 8)))
    depths = list(depth) if isinstance(depth, (list, tuple)) else [int(depth)] * levels
    try:
        with _quiet():
            unet = UNetModel(**params, transformer_depth=1)
            for block, level in _unet_levels(unet):
                _set_depth(block, depths[level])
            _set_depth(unet.middle_block, depths[-1] if depth_middle is None else int(depth_middle))
    except (TypeError, AssertionError, ValueError, IndexError) as e:
        raise LoraMakerError(f"The model config's UNet parameters are not valid for ldm's UNetModel: {e}") from e
    if num_classes == "sequential":
        width = unet.time_embed[0].out_features
        unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(int(adm_in), width), torch.nn.SiLU(), torch.nn.Linear(width, width)))
        unet.num_classes = "sequential"
    return unet


def build_vae(params: dict) -> torch.nn.Module:
    """ldm's AutoencoderKL from `first_stage_config.params`."""
    from ldm.models.autoencoder import AutoencoderKL

    try:
        with _quiet():
            return AutoencoderKL(ddconfig=dict(params["ddconfig"]), lossconfig={"target": "torch.nn.Identity"},
                                 embed_dim=int(params["embed_dim"]))
    except (KeyError, TypeError, AssertionError, ValueError) as e:
        raise LoraMakerError(f"The model config's first_stage_config does not fit ldm's AutoencoderKL: {e}") from e


def openclip_to_hf(state: dict[str, torch.Tensor], projection: bool) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's weights (token_embedding, positional_embedding, transformer.resblocks,
    ln_final, text_projection) in HF CLIPTextModel(WithProjection) names. The fused attention input
    projection is split into q, k, v; OpenCLIP's text_projection (x @ P) becomes a Linear weight (P.T)."""
    out: dict[str, torch.Tensor] = {}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key == "logit_scale":
            continue
        elif (m := block.match(key)) is not None:
            layer, name, kind = m.groups()
            target = f"text_model.encoder.layers.{layer}."
            if name == "attn.in_proj":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{target}self_attn.{part}.{kind}"] = chunk.contiguous()
            elif name in names:
                out[f"{target}{names[name]}.{kind}"] = value
            else:
                out[key] = value  # left unconverted: reported as unexpected by the loader
        else:
            out[key] = value
    return out


def _hf_text_state(state: dict, spec: TextSpec, projection: bool) -> dict[str, torch.Tensor]:
    sub = substate(state, spec.prefix)
    if spec.openclip:
        return openclip_to_hf(sub, projection)
    # transformers < 4.x saved CLIPTextModel without the text_model. level (the WebUI fixes these keys too)
    return {("text_model." + k if k.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") else k): v
            for k, v in sub.items()}


def text_config(state: dict[str, torch.Tensor], openclip: bool, overrides: dict, bos: int, eos: int):
    """CLIPTextConfig for HF-layout text weights: sizes from the shapes, heads of 64 channels, the
    activation of the family (OpenAI CLIP: quick_gelu, OpenCLIP: gelu), then `overrides`."""
    from transformers import CLIPTextConfig

    try:
        vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
        positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
        intermediate = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise LoraMakerError(f"Incomplete text encoder weights (missing {e})") from e
    projection = state["text_projection.weight"].shape[0] if "text_projection.weight" in state else hidden
    values = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
              "max_position_embeddings": positions, "projection_dim": projection,
              "hidden_act": "gelu" if openclip else "quick_gelu", "layer_norm_eps": 1e-5,
              "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    values.update(overrides)
    return CLIPTextConfig(**values)


def load_weights(module: torch.nn.Module, state: dict, what: str, name: str, ignore: tuple[str, ...] = ()) -> None:
    """Put `state` into `module` (built on the meta device) by assignment; any missing or unexpected
    weight is a clear error rather than a silently random layer."""
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:3]
        raise LoraMakerError(f"{name}: the {what} weights do not fit the model config ({'; '.join(shapes) or e});"
                             f" put the model's own config yaml beside the checkpoint") from e
    missing = [k for k in result.missing_keys if not (ignore and k.endswith(ignore))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        detail = ", ".join([f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise LoraMakerError(f"{name}: the {what} weights do not match the model config ({detail}); "
                             f"put the model's own config yaml beside the checkpoint")


def build_text_encoder(state: dict, spec: TextSpec, name: str, bos: int, eos: int) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hf = _hf_text_state(state, spec, projection=spec.pooled)
    hf.pop("text_model.embeddings.position_ids", None)  # rebuilt below: some merges saved it broken
    config = text_config(hf, spec.openclip, spec.overrides, bos, eos)
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if spec.pooled else CLIPTextModel)(config)
    load_weights(model, hf, "text encoder", name, ignore=("position_ids",))
    embeddings = model.text_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0))
    return model


def load_tokenizer(spec: ModelSpec, checkpoint: Path):
    """HF CLIPTokenizer from the config's folder, `tokenizer/` beside the checkpoint, or the HF cache."""
    from transformers import CLIPTokenizer

    folder = spec.tokenizer or checkpoint.parent / "tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    elif spec.tokenizer:
        raise LoraMakerError(f"The model config's tokenizer folder {folder} lacks vocab.json or merges.txt")
    else:
        try:
            tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", local_files_only=True)
        except (OSError, ValueError) as e:
            raise LoraMakerError(f"No CLIP tokenizer: put vocab.json and merges.txt in {folder} (or name a folder "
                                 f"in the model config's lora_maker.tokenizer)") from e
    tokenizer.model_max_length = 1 << 30  # we chunk long captions ourselves; no truncation warnings
    return tokenizer


# ------------------------------------------------------------------------------ module class swaps

@functools.lru_cache(maxsize=None)
def _swaps() -> dict[str, dict[type, type]]:
    """Subclasses of ldm modules with the same weights and results, swapped in after loading (the
    WebUI patches the same places): torch's fused attention, far less memory than ldm's einsum
    ("sdp"), and a GroupNorm that upcasts its weights too, so half-precision UNets also run where
    autocast leaves group_norm alone (CPU) ("norm")."""
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.model import AttnBlock
    from ldm.modules.diffusionmodules.util import GroupNorm32

    class SdpCrossAttention(CrossAttention):
        def forward(self, x, context=None, mask=None):
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
            b, n, _ = q.shape
            q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    class SdpAttnBlock(AttnBlock):
        def forward(self, x):
            h = self.norm(x)
            q, k, v = self.q(h), self.k(h), self.v(h)
            b, c, height, width = q.shape
            q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3) for t in (q, k, v))
            h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, height, width)
            return x + self.proj_out(h)

    class Fp32GroupNorm(GroupNorm32):
        def forward(self, x):
            weight, bias = (None if t is None else t.float() for t in (self.weight, self.bias))
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)

    return {"sdp": {CrossAttention: _named_as(SdpCrossAttention, CrossAttention),
                    AttnBlock: _named_as(SdpAttnBlock, AttnBlock)},
            "norm": {GroupNorm32: _named_as(Fp32GroupNorm, GroupNorm32)}}


def swap_classes(module: torch.nn.Module, which: str) -> None:
    swaps = _swaps()[which]
    for m in module.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]


def make_alphas_cumprod(schedule: dict) -> torch.Tensor:
    """ᾱ_t as ldm's register_schedule computes it (float64 cumulative product, then float32)."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = torch.as_tensor(make_beta_schedule(**schedule), dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def require_ldm() -> None:
    """Make the WebUI's `ldm` package importable: in a WebUI folder it sits in repositories/ (the
    WebUI adds that to sys.path when it starts; the CLI does it here)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("ldm") is not None:
        return
    from ..paths import webui_root

    root = webui_root()
    repository = root / "repositories" / "stable-diffusion-stability-ai" if root else None
    if repository is not None and (repository / "ldm").is_dir():
        sys.path.insert(0, str(repository))
        return
    raise LoraMakerError(
        "training needs the WebUI's `ldm` model classes: run the CLI with the WebUI's Python from its folder "
        "(after the WebUI has started once), or install them: pip install --no-deps stable-diffusion-sdkit"
    )
