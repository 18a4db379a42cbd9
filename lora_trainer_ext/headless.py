"""The Studio without the WebUI: training on a checkpoint file and rendering grids with the standalone
sampler. The CLI and the standalone app (`app.py`) both run on it, so a command and a click in the
standalone tab do the same thing.
"""

from __future__ import annotations

import contextlib
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .errors import LoraMakerError
from .jobs import Job, JobRunner
from .paths import default_lora_dir, default_model_cache, default_projects_root
from .studio import Studio


def standalone_studio(checkpoint: Path | None = None, root: Path | None = None,
                      lora_dir: Path | Callable[[str], Path] | None = None,
                      model_cache: Path | None = None, device: str | None = None, config: Path | None = None,
                      observe: Callable[[Job], None] | None = None) -> Studio:
    """A Studio training on `checkpoint` (loaded once per dtype, on the first run that needs it) under a
    process-wide GPU lock. `lora_dir`: a folder holding a NAME/ folder per project, or a function of the
    project name giving its folder (default: the WebUI's models/Lora/NAME, or NAME/output under `root`)."""
    root = Path(root) if root else default_projects_root()
    cache = Path(model_cache) if model_cache else default_model_cache()
    gpu = threading.Lock()

    @lru_cache(maxsize=1)
    def host(precision: str):
        import torch

        from .hosts.standalone import load_checkpoint

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # frozen weights in the autocast dtype on a GPU, as the WebUI keeps them; full precision on the CPU
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        return load_checkpoint(checkpoint, config, device=dev, dtype=half if dev.startswith("cuda") else torch.float32)

    def open_host(settings=None):
        if checkpoint is None:
            raise LoraMakerError("no model to train on: give a checkpoint (--checkpoint FILE)")
        return contextlib.nullcontext(host(settings.mixed_precision if settings else "fp16"))

    @lru_cache(maxsize=1)
    def model_kind():
        if checkpoint is None:
            return None
        from .hosts.checkpoint import detect_kind, read_state_dict

        path = Path(checkpoint)
        if path.suffix.lower() == ".safetensors":  # the names alone, without reading gigabytes
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return detect_kind(f.keys(), path.name)
        return detect_kind(read_state_dict(path).keys(), path.name)

    @contextlib.contextmanager
    def open_renderer():
        from .hosts.standalone_render import StandaloneRenderer

        with open_host() as model:
            yield StandaloneRenderer(model)

    return Studio(
        open_renderer=open_renderer,
        projects_root=lambda: root,
        model_cache=lambda: cache,
        open_host=open_host,
        model_kind=model_kind,
        lora_dir=lora_dir if callable(lora_dir) else
        lambda name: Path(lora_dir) / name if lora_dir else default_lora_dir(name, root),
        jobs=JobRunner(guard=lambda job: gpu, observe=observe),
    )
