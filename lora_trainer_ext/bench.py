"""Benchmarks that print a table: `python -m lora_trainer_ext bench dedupe`.

Hashing speed is measured on generated images of booru-like sizes written to a temporary project;
grouping speed on synthetic perceptual hashes with planted near-duplicates, so the 10k case needs
no 10k image files."""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .dedupe import DEFAULT_THRESHOLD, ImageInfo, find_groups, scan
from .project import Project


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
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
