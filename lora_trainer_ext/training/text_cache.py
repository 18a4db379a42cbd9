"""Text-encoder outputs encoded once per image and orientation before the loop (the XL trainer's
cache_text_encoder_outputs), for runs that do not train the text encoders: the conditioning of each
caption as written (the run then shuffles and drops nothing), with SDXL's size conditioning of that
image and orientation, kept in RAM or in files on disk.

A batch joins its captions' cached conditionings. Captions of fewer 75-token chunks are padded with the
encoding of an empty chunk, which is what encoding them together gives (chunks are encoded one by one),
so a batch of unweighted captions is conditioned exactly as without the cache. With emphasis weights,
"(word:1.2)", the WebUI rescales over the whole batch, the cache over each caption.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..hosts.host import SDXL, Host, crossattn
from ..progress import Progress
from .data import TrainData
from .latents import cache_each, cached

CHUNK = 77  # positions per encoded chunk


def cache_conditioning(host: Host, data: TrainData, progress: Progress, disk: Path | None = None) -> dict:
    """{(image index, flip): conditioning (or the file holding it)} for every key the run can ask for,
    plus "empty": one empty chunk's encoding, what shorter captions are padded with."""
    keys = data.cache_keys()

    def encode(key: tuple[int, bool], caption: str | None = None):
        sizes = data.sizes_of([key]) if host.kind == SDXL else None
        cond = host.conditioning([data.items[key[0]].caption if caption is None else caption], sizes)
        if isinstance(cond, dict):
            return {name: value.detach().float().cpu() for name, value in cond.items()}
        return cond.detach().float().cpu()

    with torch.no_grad():
        empty = crossattn(encode(keys[0], ""))[:, :CHUNK]
    return {**cache_each(keys, encode, progress, "text-encoder outputs", disk), "empty": empty}


def batch_conditioning(cache: dict, keys: list, device: torch.device):
    """The conditioning of a batch (`keys` as the latents'), from the cache, on `device`."""
    conds = [cached(cache, key) for key in keys]
    longest = max(crossattn(c).shape[1] for c in conds)
    empty = cache["empty"]

    def padded(crossattn: torch.Tensor) -> torch.Tensor:
        missing = (longest - crossattn.shape[1]) // CHUNK
        return torch.cat([crossattn, *[empty] * missing], dim=1)

    if isinstance(conds[0], dict):
        return {"crossattn": torch.cat([padded(c["crossattn"]) for c in conds]).to(device),
                "vector": torch.cat([c["vector"] for c in conds]).to(device)}
    return torch.cat([padded(c) for c in conds]).to(device)
