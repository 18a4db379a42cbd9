"""bench grid: `grids.render_grid` on a random-weight model with random LoRA "epochs". Generation is
the renderer's sampling and VAE decoding inside that grid; everything else is the grid's overhead:
planning, loading LoRA files, attaching and detaching them, infotexts, PNG saving, scoring
(overcooking only: no tagger is downloaded), grid assembly and grid.json. For scale, the floors:
sampling + decoding one image alone, without and with a LoRA attached (its bypass modules compute at
every step, which the WebUI, merging the weights, does not pay).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMakerError
from ..hosts.host import SDXL, Host
from ..project import Project
from ..training.network import Network, NetworkConfig
from .bench import bench_host, environment, render_table, sync
from .random_models import CAPTION_TAGS, preset

GRID_WEIGHTS = (0.0, 0.5, 1.0)
GRID_EPOCHS = 2


@dataclass
class GridRow:
    model: str
    side: int
    steps: int
    images: int  # distinct images rendered
    total_s: float  # planning + render_grid
    floor_s: float  # median sampling + decode of one image without a LoRA, alone
    lora_floor_s: float  # the same with a LoRA attached
    phases: dict[str, float]  # seconds in the grid: plan, load, sample, decode, render (all the
    # renderer's calls), save, score, assemble, write

    @property
    def generation_s(self) -> float:
        return self.phases["sample"] + self.phases["decode"]

    @property
    def overhead_s(self) -> float:
        return self.total_s - self.generation_s

    @property
    def apply_s(self) -> float:
        """The renderer's calls beyond loading, sampling and decoding: attach, detach, infotexts."""
        return self.phases["render"] - self.phases["load"] - self.generation_s


def random_lora_epochs(host: Host, lora_dir: Path, name: str, epochs: int, seed: int = 0) -> None:
    """`epochs` LoRA files `name-000001..` and the final `name` of one made-up run, with small random
    weights (UNet, and the text encoder where the kind allows), in the layout the trainer writes."""
    from ..training import lora_file

    generator = torch.Generator().manual_seed(seed)
    network = Network(host, NetworkConfig("lora", 8, 8.0), train_text_encoder=host.kind != SDXL)
    info = lora_file.NetworkInfo(8, 8.0)
    for epoch in range(1, epochs + 1):
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        tensors = lora_file.to_output_names(network.lora_state_dict(), host.kind, network.module_paths())
        metadata = lora_file.lora_metadata(host.kind, host.parameterization, info,
                                           {"output_name": name, "session_id": seed, "epoch": epoch})
        stem = name if epoch == epochs else f"{name}-{epoch:06d}"
        lora_file.save_lora(lora_dir / f"{stem}.safetensors", tensors, metadata)


def _generation_time(renderer, cell, settings, repeats: int) -> float:
    """Median seconds of the renderer's sampling + VAE decode of `cell` (its LoRA as the caller set it)."""
    times = []
    for _ in range(repeats):
        sync(renderer.host.device)
        start = time.perf_counter()
        renderer.host.decode_latents(renderer.sample(cell, settings))
        sync(renderer.host.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_benchmark(models: list[str], steps: int = 20, resolution: int | None = None, sampler: str = "DPM++ 2M",
                   device: str | torch.device = "cpu", repeats: int = 3, on_row=None) -> list[GridRow]:
    """A GridRow per model: a grid of GRID_EPOCHS epochs x GRID_WEIGHTS rendered with `render_grid`,
    after one untimed warm-up image (first-call allocations, the checkpoint's hash)."""
    from ..grids.plan import RenderSettings, make_plan
    from ..grids.render import render_grid
    from ..hosts.standalone_render import StandaloneRenderer, applied

    if steps < 1 or repeats < 1:
        raise LoraMakerError("bench grid needs --steps of at least 1")
    device = torch.device(device)
    rows = []
    for model in models:
        side = resolution or preset(model)[1].resolution
        with tempfile.TemporaryDirectory(prefix="lora-maker-bench-") as tmp:
            host = bench_host(Path(tmp) / "model", model, device)
            lora_dir = Path(tmp) / "lora"
            random_lora_epochs(host, lora_dir, "bench", GRID_EPOCHS)
            project = Project.open(Path(tmp) / "projects", "bench", create=True)
            prompt = ", ".join(CAPTION_TAGS[:8])
            settings = RenderSettings(sampler=sampler, steps=steps, width=side, height=side)
            renderer = StandaloneRenderer(host)

            start = time.perf_counter()
            plan = make_plan(lora_dir, "bench", [("main", prompt)], weights=GRID_WEIGHTS, settings=settings)
            plan_s = time.perf_counter() - start
            cells = plan.cells()
            bare = next(c for c in cells if not c.weight)
            with_lora = next(c for c in cells if c.weight)
            renderer.render(bare, settings)  # warm-up
            floor = _generation_time(renderer, bare, settings, repeats)
            with applied(renderer.lora(with_lora.epoch.path).network, with_lora.weight):
                lora_floor = _generation_time(renderer, with_lora, settings, repeats)
            renderer.refresh()  # the grid loads its LoRA files itself, as after training
            renderer.seconds = dict.fromkeys(renderer.seconds, 0.0)

            sync(device)
            start = time.perf_counter()
            result = render_grid(project, plan, renderer)
            sync(device)
            total = time.perf_counter() - start + plan_s
            row = GridRow(model, side, steps, result.rendered, total, floor, lora_floor,
                          {"plan": plan_s, **renderer.seconds, **result.timings})
            rows.append(row)
            if on_row:
                on_row(row)
            del host, renderer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


GRID_COLUMNS = ("model", "size", "steps", "images", "s/image", "generation s/image", "overhead s/image", "overhead",
                "floor s/image", "LoRA floor s/image")
GRID_PHASES = ("plan", "LoRA load", "attach+infotext", "save", "score", "assemble", "write")


def grid_row(row: GridRow) -> tuple[str, ...]:
    n = row.images
    return (row.model, f"{row.side}px", str(row.steps), str(n), f"{row.total_s / n:.3f}", f"{row.generation_s / n:.3f}",
            f"{row.overhead_s / n:.3f}", f"{row.overhead_s / row.generation_s:.1%}", f"{row.floor_s:.3f}",
            f"{row.lora_floor_s:.3f}")


def grid_phase_row(row: GridRow) -> tuple[str, ...]:
    p = row.phases
    values = (p["plan"], p["load"], row.apply_s, p["save"], p["score"], p["assemble"], p["write"])
    return (row.model, *(f"{v * 1000:.1f}" for v in values))


def grid_table(rows: list[GridRow], device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    weights = ", ".join(f"{w:g}" for w in GRID_WEIGHTS)
    notes = [environment(device),
             f"one prompt x {GRID_EPOCHS} epochs x weights {weights} (0 = no LoRA, rendered once); s/image: the whole "
             f"grid, planning included, per image rendered; generation: the renderer's sampling + VAE decode in the "
             f"grid; overhead: the rest (per image, and as a share of generation); floor: sampling + decode of one "
             f"image alone (median), without and with a LoRA attached"]
    phases = render_table([("model", *(f"{name} ms" for name in GRID_PHASES)), *map(grid_phase_row, rows)])
    return "\n".join([*notes, render_table([GRID_COLUMNS, *map(grid_row, rows)]),
                      "overhead by phase, whole grid (score: overcooking only, no tagger):", phases])
