"""Exact and near-duplicate images: content hashes plus 64-bit perceptual hashes (imagehash pHash),
grouped around a suggested keeper (the largest resolution). Hashes are cached per file, so changing
the threshold regroups instantly; the pair search is vectorised (no Python loop over pairs)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import files
from ..errors import LoraMakerError
from ..progress import Progress
from ..project import Project
from .images import ImageRejected, decode_small
from .trash import move_to_trash

DEFAULT_THRESHOLD = 8  # bits of 64; re-encodes and resizes land at 0-4, unrelated photos at 20+ (tests/test_dedupe.py)
MAX_THRESHOLD = 16  # unrelated images match well before this, and the search nears all pairs


@dataclass
class ImageInfo:
    name: str
    bytes: int
    mtime_ns: int
    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: str = ""  # 16 hex digits; empty when the image is unreadable
    error: str = ""  # why the image is unreadable


def inspect(path: Path) -> ImageInfo:
    """Content hash, size and perceptual hash of one image file (the slow part: decoding)."""
    import imagehash  # an optional dependency: only dedupe needs it

    stat = path.stat()
    info = ImageInfo(path.name, stat.st_size, stat.st_mtime_ns)
    data = path.read_bytes()
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        img, (info.width, info.height) = decode_small(data, 64)
    except ImageRejected as e:
        info.error = str(e)
        return info
    info.phash = str(imagehash.phash(img.convert("L")))
    return info


def scan(project: Project, progress: Progress | None = None, workers: int | None = None) -> list[ImageInfo]:
    """ImageInfo of every dataset image, reusing the cache for files whose size and mtime are unchanged."""
    cache_path = project.cache_dir / "images.json"
    cached = {i["name"]: ImageInfo(**i) for i in files.read_json(cache_path, [])}
    infos, todo = {}, []
    for image in project.images():
        stat = image.stat()
        hit = cached.get(image.name)
        if hit and hit.bytes == stat.st_size and hit.mtime_ns == stat.st_mtime_ns:
            infos[image.name] = hit
        else:
            todo.append(image)
    progress = progress or Progress()
    with progress.task("hashing images", len(todo)) as task, ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for info in pool.map(inspect, todo):  # Pillow and hashlib release the GIL while decoding
            infos[info.name] = info
            task.advance()
    result = [infos[name] for name in sorted(infos)]
    if todo or len(result) != len(cached):
        files.write_json(cache_path, [asdict(i) for i in result])
    return result


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def _runs(order: np.ndarray, counts: np.ndarray, chunk: int):
    """(a, b) index arrays pairing each sorted position p with the next counts[p] positions,
    yielded in pieces of about `chunk` pairs so memory stays bounded whatever the data."""
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(chunk, ends[-1] if len(ends) else 0, chunk))
    bounds = np.unique(np.r_[0, cuts, len(counts)])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c = counts[lo:hi]
        p = np.repeat(np.arange(lo, hi), c)
        q = p + 1 + np.arange(len(p)) - np.repeat(np.cumsum(c) - c, c)
        yield order[p], order[q]


def close_pairs(hashes: np.ndarray, threshold: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of 64-bit hashes at most `threshold` bits apart, as (i, j, distance) arrays.

    Multi-index hashing: cut the 64 bits into threshold + 1 segments; two hashes that close agree
    exactly on at least one segment (pigeonhole). Per segment, sort by its value and pair up only the
    hashes of equal value, then check the full distance: a few sorts instead of n^2/2 comparisons."""
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise LoraMakerError(f"the duplicate threshold must be 0 to {MAX_THRESHOLD} bits, got {threshold}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    bounds = np.linspace(0, 64, threshold + 2).astype(int)
    pair_keys, distances = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        segment = (hashes >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(segment, kind="stable")
        run_starts = np.flatnonzero(np.r_[True, segment[order][1:] != segment[order][:-1]])
        run_ends = np.r_[run_starts[1:], n]
        counts = np.repeat(run_ends, run_ends - run_starts) - np.arange(n) - 1  # later positions in the run
        for a, b in _runs(order, counts, chunk):
            dist = _popcount(hashes[a] ^ hashes[b]).astype(np.int64)
            close = dist <= threshold
            pair_keys.append(np.minimum(a, b)[close].astype(np.int64) * n + np.maximum(a, b)[close])
            distances.append(dist[close])
    keys, first = np.unique(np.concatenate(pair_keys), return_index=True)
    n = max(n, 1)
    return keys // n, keys % n, np.concatenate(distances)[first]


@dataclass
class Duplicate:
    name: str
    distance: int  # differing bits of the perceptual hash
    exact: bool  # the same bytes as the keeper


@dataclass
class Group:
    keeper: ImageInfo
    duplicates: list[Duplicate] = field(default_factory=list)


def _keeper_rank(info: ImageInfo) -> tuple:
    """Best first: most pixels; at equal size a lossless file (no JPEG artefacts), then more bytes."""
    lossless = Path(info.name).suffix.lower() in (".png", ".bmp")
    return (-info.width * info.height, not lossless, -info.bytes, info.name)


def find_groups(infos: list[ImageInfo], threshold: int = DEFAULT_THRESHOLD) -> list[Group]:
    """Groups of near-duplicates, each around its best image (`_keeper_rank`): every
    member is within `threshold` bits of its keeper, so a group never chains unlike images together."""
    usable = [i for i in infos if i.phash]
    if not usable:
        return []
    hashes = np.array([int(i.phash, 16) for i in usable], dtype=np.uint64)
    a, b, d = close_pairs(hashes, threshold)
    neighbours: dict[int, dict[int, int]] = {}
    for x, y, dist in zip(a.tolist(), b.tolist(), d.tolist()):
        neighbours.setdefault(x, {})[y] = dist
        neighbours.setdefault(y, {})[x] = dist
    order = sorted(neighbours, key=lambda k: _keeper_rank(usable[k]))
    taken: set[int] = set()
    groups = []
    for k in order:
        if k in taken:
            continue
        members = sorted((m for m in neighbours[k] if m not in taken), key=lambda m: (neighbours[k][m], usable[m].name))
        if not members:
            continue
        taken.update(members, [k])
        keeper = usable[k]
        dups = [Duplicate(usable[m].name, neighbours[k][m], usable[m].sha256 == keeper.sha256) for m in members]
        groups.append(Group(keeper, dups))
    return sorted(groups, key=lambda g: g.keeper.name)


def trash_duplicates(project: Project, groups: list[Group]) -> int:
    """Move every non-keeper to the trash (restorable), noting which image it duplicated."""
    reasons = {
        project.dataset_dir / dup.name: f"duplicate of {group.keeper.name} ("
        + ("exact copy" if dup.exact else f"{dup.distance} bits apart")
        + ")"
        for group in groups
        for dup in group.duplicates
    }
    return len(move_to_trash(project, reasons))
