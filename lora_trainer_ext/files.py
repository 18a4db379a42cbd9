"""Atomic writes and safe moves: an interrupted write never leaves a half-written caption or settings file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def _read_umask() -> int:
    # Read once, at import: setting the umask to read it back is not safe once job threads write files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_read_umask()


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file in the same folder, fsync, then rename over.
    The file gets the mode a new file gets under the user's umask (mkstemp's own 0600 would lock out
    a WebUI or ComfyUI running as another user, e.g. in Docker over a shared models folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def free_path(path: Path, sidecars: tuple[str, ...] = ()) -> Path:
    """`path` if it and its `sidecars` (other suffixes of the same stem) are free, else the first free
    `stem-2.ext`, `stem-3.ext`, ... (moves never overwrite)."""
    path = Path(path)
    n = 2
    candidate = path
    while any(p.exists() for p in (candidate, *(candidate.with_suffix(s) for s in sidecars))):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def move(src: Path, dst: Path) -> None:
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
