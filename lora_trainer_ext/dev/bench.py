"""Benchmarks that print a table: `python -m lora_trainer_ext bench dedupe|train|grid`.

dedupe: hashing speed is measured on generated images of booru-like sizes written to a temporary
project; grouping speed on synthetic perceptual hashes with planted near-duplicates, so the 10k case
needs no 10k image files.

train: seconds per step of the real `trainer.train()` loop on a random-weight checkpoint
(`random_models`) and a generated project, against the floor: the bare UNet forward + MSE + backward
of the same host with the same network attached, on precomputed latents and conditioning. Their ratio
is the trainer's own overhead (data, noise, conditioning, optimizer, logging): the target is < 1.10.

grid: in bench_grid.py.
"""

from __future__ import annotations

import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..dataset.dedupe import DEFAULT_THRESHOLD, ImageInfo, find_groups, scan
from ..errors import LoraMakerError
from ..hosts.host import SDXL, Host, SizeInfo
from ..hosts.standalone import load_checkpoint
from ..progress import Status
from ..project import Project
from ..training.optimizers import autocast_for
from ..training.settings import TrainSettings
from ..training.trainer import train
from .random_models import CAPTION_TAGS, preset, preset_checkpoint


def _make_images(folder: Path, count: int, size: tuple[int, int], fmt: str, rng: np.random.Generator) -> None:
    from PIL import Image, ImageFilter

    for i in range(count):
        # Smooth noise: compresses and decodes like an illustration, not like white noise.
        small = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        buf = io.BytesIO()
        img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        (folder / f"img{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(buf.getvalue())


def hashing_rate(count: int, size: tuple[int, int], fmt: str, workers: int) -> float:
    """Images per second through `dedupe.scan` (cold cache: decode, sha256, pHash)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        project = Project.open(Path(tmp), "bench", create=True)
        _make_images(project.dataset_dir, count, size, fmt, rng)
        start = time.perf_counter()
        scan(project, workers=workers)
        return count / (time.perf_counter() - start)


def synthetic_infos(count: int, rng: np.random.Generator) -> list[ImageInfo]:
    """`count` hashes: 90% unrelated, 10% near copies (1-4 bits flipped) of another one."""
    base = rng.integers(0, 2**63, count, dtype=np.uint64) | (rng.integers(0, 2, count, dtype=np.uint64) << np.uint64(63))
    copies = rng.choice(count, count // 10, replace=False)
    sources = rng.integers(0, count, len(copies))
    for i, src in zip(copies, sources):
        flips = rng.choice(64, rng.integers(1, 5), replace=False)
        base[i] = base[src] ^ np.uint64(sum(1 << int(b) for b in flips))
    return [
        ImageInfo(f"{i:06d}.png", 100_000 + i, 0, 512, 512, f"{i:064x}", f"{int(h):016x}")
        for i, h in enumerate(base)
    ]


def grouping_time(count: int, threshold: int, repeats: int = 3) -> tuple[float, int]:
    """Best-of-`repeats` seconds for `find_groups` over `count` images, and the number of groups."""
    infos = synthetic_infos(count, np.random.default_rng(count))
    best, groups = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        groups = len(find_groups(infos, threshold))
        best = min(best, time.perf_counter() - start)
    return best, groups


def dedupe_table(images: int = 200) -> str:
    workers = os.cpu_count() or 1
    rows = [("what", "size", "result")]
    for fmt, size in [("JPEG", (1024, 1536)), ("PNG", (1024, 1536)), ("JPEG", (2048, 3072))]:
        rate = hashing_rate(images, size, fmt, workers)
        rows.append((f"hash {images} {fmt} images ({workers} workers)", f"{size[0]}x{size[1]}", f"{rate:,.0f} images/s"))
    for count, threshold in [(1_000, DEFAULT_THRESHOLD), (10_000, DEFAULT_THRESHOLD), (10_000, 12), (100_000, DEFAULT_THRESHOLD)]:
        seconds, groups = grouping_time(count, threshold)
        rows.append((f"group {count:,} hashes, threshold {threshold}", "-", f"{seconds * 1000:,.1f} ms ({groups:,} groups)"))
    return render_table(rows)


# ------------------------------------------------------------------------------------------ training

WARMUP_STEPS = 2  # not timed: first-call allocations, the optimizer's state, autotuning


@dataclass
class TrainCase:
    model: str  # a random_models preset ("tiny-sdxl": that preset's SDXL)
    resolution: int
    batch: int
    network: str  # "lora" or "locon"
    text_cache: str = "no"  # cache_text_encoder_outputs


@dataclass
class TrainRow:
    case: TrainCase
    step_s: float  # median seconds per timed step of train(), over every round
    floor_s: float  # median seconds per timed forward + loss + backward, over every round
    peak_bytes: int | None  # during train()'s timed steps
    ratios: list[float]  # per round (a train() run): its steps' median over its floor steps' median

    @property
    def samples_per_s(self) -> float:
        return self.case.batch / self.step_s

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios: each compares blocks measured back to back, so a machine that
        slows down or speeds up between rounds moves both sides of a ratio, not one."""
        return statistics.median(self.ratios)


def _rss_reader():
    """(a function giving this process's resident memory in bytes, its source): psutil, else Linux's
    /proc; (None, "") where neither is there."""
    try:
        import psutil

        process = psutil.Process()
        return (lambda: process.memory_info().rss), "psutil"
    except ImportError:
        pass
    statm = Path("/proc/self/statm")
    if statm.is_file():
        page = os.sysconf("SC_PAGE_SIZE")
        return (lambda: int(statm.read_text().split()[1]) * page), "/proc/self/statm"
    return None, ""


class PeakMemory:
    """The peak memory of a stretch of work, between `start()` and `stop()`. CUDA: the allocator's peak.
    CPU: the process's RSS sampled every few milliseconds (torch's CPU tensors are invisible to
    tracemalloc), or where RSS can't be read, the process's lifetime peak RSS (ru_maxrss)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.read, self.source = (None, "") if device.type == "cuda" else _rss_reader()
        self._thread: threading.Thread | None = None
        self._running = False
        self._peak = 0

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated over the timed steps"
        if self.read is not None:
            return (f"process RSS sampled every 5 ms over the timed steps ({self.source}; the whole process, so "
                    "run one --model per process for that model's own figure)")
        return "process lifetime peak RSS (ru_maxrss: neither psutil nor /proc)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.read is not None:
            self._peak, self._running = self.read(), True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self.read())
            time.sleep(0.005)

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self._thread is not None:
            self._running = False
            self._thread.join()
            self._thread = None
            return self._peak
        try:
            import resource
        except ImportError:  # Windows
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _caption(rng: np.random.Generator) -> str:
    return ", ".join(rng.choice(CAPTION_TAGS, 12, replace=False))


def synthetic_project(root: Path, images: int, resolution: int, seed: int = 0) -> Project:
    """A project of `images` square generated pictures of side `resolution` with booru-style captions."""
    rng = np.random.default_rng(seed)
    project = Project.open(root, "bench", create=True)
    _make_images(project.dataset_dir, images, (resolution, resolution), "PNG", rng)
    for image in project.images():
        Project.caption_path(image).write_text(_caption(rng), encoding="utf-8")
    return project


def bench_settings(case: TrainCase, steps: int) -> TrainSettings:
    """The guide's defaults at the case's size, UNet only, as one epoch of exactly `steps` steps
    (so no epoch file or state is saved between timed steps)."""
    return TrainSettings(resolution=case.resolution, min_bucket=min(256, case.resolution),
                         max_bucket=case.resolution, batch_size=case.batch, repeats=steps, epochs=1,
                         max_steps=steps, save_every_n_epochs=0, text_encoder_lr=0.0, network=case.network,
                         cache_text_encoder_outputs=case.text_cache)


def floor_step(host: Host, settings: TrainSettings, seed: int = 0):
    """A function running one bare forward + MSE + backward of `host`'s UNet, with whatever network is
    attached, on fixed latents and conditioning of the trainer's shapes (no data, noise, optimizer or
    logging): the floor a training step is measured against. Its gradients land where the trainer's do,
    after its optimizer step; the trainer clears them before its next step."""
    s = settings.resolved(host.kind)
    side, batch = s.resolution, s.batch_size
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    autocast, _ = autocast_for(host, s.mixed_precision)
    with torch.no_grad():
        shape = host.encode_images(torch.zeros(1, 3, side, side)).shape[1:]  # the VAE's latent shape
        sizes = [SizeInfo((side, side), (0, 0), (side, side))] * batch if host.kind == SDXL else None
        with autocast:
            cond = host.conditioning([_caption(rng) for _ in range(batch)], sizes)
    latents = torch.randn((batch, *shape), generator=generator).to(host.device, host.dtype)
    wanted = torch.randn((batch, *shape), generator=generator).to(host.device)
    timesteps = torch.randint(0, len(host.alphas_cumprod), (batch,), generator=generator).to(host.device)

    def step() -> float:
        sync(host.device)
        start = time.perf_counter()
        with autocast:
            prediction = host.apply_model(latents, timesteps, cond)
        F.mse_loss(prediction.float(), wanted).backward()
        sync(host.device)
        return time.perf_counter() - start

    return step


def interleaved_step_times(host: Host, project: Project, settings: TrainSettings, lora_dir: Path, warmup: int,
                           memory: PeakMemory) -> tuple[list[float], list[float], int | None]:
    """(seconds of each step of `train()` after `warmup` steps, seconds of a floor step run right after each
    of them, the peak memory over the timed steps). The two alternate step by step inside the run: the same
    model, network (attached, in training mode), precision, checkpointing and threads, and a machine that
    drifts moves both. A training step is the time between statuses less the floor step between them, so
    latent caching is left out."""
    floor = floor_step(host, settings)
    ours: list[float] = []
    floors: list[float] = []
    peak: list[int | None] = [None]
    done = [0.0]  # when the last status (and its floor step) ended

    def on_status(status: Status) -> None:
        if status.phase != "training":
            return
        now = time.perf_counter()
        if status.step > warmup:
            ours.append(now - done[0])
        if status.step == warmup:
            memory.start()
        if status.step == status.total_steps:
            peak[0] = memory.stop()
        elif status.step >= warmup:
            floors.append(floor())
        done[0] = time.perf_counter()

    try:
        train(project, host, settings, lora_dir, name="bench", on_status=on_status)
    finally:
        if peak[0] is None:  # stopped early: don't leave the RSS sampler running
            memory.stop()
    return ours, floors, peak[0]


def bench_host(folder: Path, model: str, device: torch.device) -> Host:
    """A random-weight host of preset `model`, written as a checkpoint and loaded as the CLI loads one
    (fp16 weights on CUDA, fp32 on the CPU)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    path = preset_checkpoint(folder, model, dtype=dtype, device=device)
    return load_checkpoint(path, device=device, dtype=dtype)


def train_benchmark(models: list[str], networks: list[str], batch: int = 4, steps: int = 5,
                    resolution: int | None = None, device: str | torch.device = "cpu",
                    warmup: int = WARMUP_STEPS, on_row=None, rounds: int = 3) -> list[TrainRow]:
    """A TrainRow per (model, network): `rounds` runs of train() with `steps` timed steps, each followed by a
    floor step, in one process on the same host, inputs and threads."""
    if steps < 1 or batch < 1 or warmup < 1 or rounds < 1:
        raise LoraMakerError("bench train needs --steps, --batch and --rounds of at least 1")
    device = torch.device(device)
    memory = PeakMemory(device)
    rows = []
    for model in models:
        side = resolution or preset(model)[1].resolution
        with tempfile.TemporaryDirectory(prefix="lora-maker-bench-") as tmp:
            host = bench_host(Path(tmp) / "model", model, device)
            project = synthetic_project(Path(tmp) / "projects", batch, side)
            # SDXL with and without cached text-encoder outputs: what the cache saves per step
            caches = ("no", "ram") if host.kind == SDXL else ("no",)
            for network, cache in itertools.product(networks, caches):
                case = TrainCase(model, side, batch, network, cache)
                settings = bench_settings(case, warmup + steps)
                ours, floor, ratios, peaks = [], [], [], []
                for _ in range(rounds):
                    block, floor_block, peak = interleaved_step_times(host, project, settings, Path(tmp) / "lora",
                                                                      warmup, memory)
                    ours += block
                    floor += floor_block
                    ratios.append(statistics.median(block) / statistics.median(floor_block))
                    peaks.append(peak)
                known = [p for p in peaks if p is not None]
                row = TrainRow(case, statistics.median(ours), statistics.median(floor), max(known) if known else None,
                               ratios)
                rows.append(row)
                if on_row:
                    on_row(row)
            del host
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


TRAIN_COLUMNS = ("model", "resolution", "batch", "network", "TE cache", "s/step", "samples/s", "peak mem",
                 "floor s/step", "ratio", "ratio range")


def _size(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def train_row(row: TrainRow) -> tuple[str, ...]:
    c = row.case
    return (c.model, f"{c.resolution}px", str(c.batch), c.network, c.text_cache, f"{row.step_s:.3f}",
            f"{row.samples_per_s:.2f}",
            _size(row.peak_bytes), f"{row.floor_s:.3f}", f"{row.ratio:.3f}",
            f"{min(row.ratios):.3f}-{max(row.ratios):.3f} ({len(row.ratios)} rounds)")


def render_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first the header) as aligned text columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    """What the numbers were measured on: device, torch version, CPU threads."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return (f"device: {device} ({where}); torch {torch.__version__}; {torch.get_num_threads()} CPU threads "
            f"of {os.cpu_count()} cores")


def train_table(rows: list[TrainRow], device: str | torch.device = "cpu", warmup: int = WARMUP_STEPS) -> str:
    device = torch.device(device)
    notes = [environment(device), f"peak mem: {PeakMemory(device).description}",
             f"s/step: median of the timed steps of train() (after {warmup} warm-up steps; latent caching "
             "excluded); floor: median forward + MSE + backward alone, one after each timed training step; "
             "ratio: the median over the rounds (runs of train()) of their train() median / floor median, its range "
             "beside it (target <= 1.05)"]
    return "\n".join([*notes, render_table([TRAIN_COLUMNS, *map(train_row, rows)])])
