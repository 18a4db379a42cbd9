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

from ..errors import Stopped
from ..hosts.host import SDXL, Host
from ..progress import Progress
from .data import TrainData
from .latents import cached

CHUNK = 77  # positions per encoded chunk


def cache_conditioning(host: Host, data: TrainData, progress: Progress, disk: Path | None = None) -> dict:
    """{(image index, flip): conditioning (or the file holding it)} for every key the run can ask for,
    plus "empty": one empty chunk's encoding, what shorter captions are padded with."""
    keys = data.cache_keys()
    cache: dict = {}
    with torch.no_grad(), progress.task("caching text-encoder outputs", len(keys) + 1) as task:
        first = data.sizes_of([keys[0]]) if host.kind == SDXL else None
        cache["empty"] = _crossattn(_cpu(host.conditioning([""], first)))[:, :CHUNK]
        task.advance()
        for key in keys:
            if progress.should_stop():
                raise Stopped("stopped while caching text-encoder outputs: nothing was trained yet")
            sizes = data.sizes_of([key]) if host.kind == SDXL else None
            cond = _cpu(host.conditioning([data.items[key[0]].caption], sizes))
            if disk is None:
                cache[key] = cond
            else:
                path = disk / f"{key[0]:06d}{'-flip' if key[1] else ''}.pt"
                torch.save(cond, path)
                cache[key] = path
            task.advance()
    return cache


def batch_conditioning(cache: dict, keys: list, device: torch.device):
    """The conditioning of a batch (`keys` as the latents'), from the cache, on `device`."""
    conds = [cached(cache, key) for key in keys]
    longest = max(_crossattn(c).shape[1] for c in conds)
    empty = cache["empty"]

    def padded(crossattn: torch.Tensor) -> torch.Tensor:
        missing = (longest - crossattn.shape[1]) // CHUNK
        return torch.cat([crossattn, *[empty] * missing], dim=1)

    if isinstance(conds[0], dict):
        return {"crossattn": torch.cat([padded(c["crossattn"]) for c in conds]).to(device),
                "vector": torch.cat([c["vector"] for c in conds]).to(device)}
    return torch.cat([padded(c) for c in conds]).to(device)


def _crossattn(cond) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _cpu(cond):
    if isinstance(cond, dict):
        return {key: value.detach().float().cpu() for key, value in cond.items()}
    return cond.detach().float().cpu()
