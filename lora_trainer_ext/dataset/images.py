"""Image checks and normalisation: every image that enters a dataset decodes fully, is not animated,
has no transparency (composited on white), is upright (EXIF orientation applied) and is in a format
the trainer reads. Bad files are rejected with a reason, never a crash."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import LoraMakerError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageRejected(LoraMakerError):
    """The bytes are not an image the dataset can take; the message says why."""


@dataclass
class Normalised:
    data: bytes
    ext: str
    width: int
    height: int
    changed: bool  # False: `data` are the original bytes


def _truncated(data: bytes, fmt: str) -> bool:
    # Belt and braces: Pillow accepts truncated files when some other code in the process (the WebUI
    # has extensions that do) set ImageFile.LOAD_TRUNCATED_IMAGES, so look for the end marker too.
    if fmt == "JPEG":
        return data.rfind(b"\xff\xd9") == -1
    if fmt == "PNG":
        return data.rfind(b"IEND") == -1
    return False


def _open(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, *_DECODE_ERRORS) as e:
        head = data[:16]
        kind = "an HTML page" if head.lstrip().lower().startswith((b"<!doctype", b"<html")) else "not an image"
        raise ImageRejected(f"{kind} ({len(data)} bytes)") from e
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ImageRejected(f"animated {img.format} ({frames} frames)")
    if _truncated(data, img.format):
        raise ImageRejected(f"truncated {img.format} ({len(data)} bytes)")
    return img


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise ImageRejected(f"corrupt or truncated {img.format}: {e}") from e
    return img


def decode(data: bytes) -> Image.Image:
    """Open and fully decode `data`, or raise ImageRejected saying why it is unusable."""
    return _load(_open(data))


def decode_small(data: bytes, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode all of `data` (so damage is still caught) into an image of about `size` pixels a side
    where the format allows it (JPEG decodes at 1/2 to 1/8 scale, several times faster); also returns
    the full size."""
    img = _open(data)
    full = img.size
    img.draft(img.mode if img.mode in ("RGB", "L") else None, (size, size))
    return _load(img), full


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def flatten(img: Image.Image) -> Image.Image:
    """RGB (or L) with any transparency composited on white."""
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def normalise(data: bytes, max_pixels: int | None = None) -> Normalised:
    """Check `data` and return bytes fit for a dataset, re-encoding only when something must change:
    transparency, an unusual mode or format, EXIF rotation, or more than `max_pixels` pixels."""
    img = decode(data)
    fmt = img.format
    rotated = img.getexif().get(_ORIENTATION, 1) not in (0, 1)
    too_big = bool(max_pixels) and img.width * img.height > max_pixels
    keep = fmt in _KEPT_FORMATS and not _has_alpha(img) and img.mode in ("RGB", "L") and not rotated and not too_big
    if keep:
        return Normalised(data, _KEPT_FORMATS[fmt], img.width, img.height, changed=False)

    out = flatten(ImageOps.exif_transpose(img) if rotated else img)
    if too_big:
        scale = math.sqrt(max_pixels / (out.width * out.height))
        out = out.resize((max(1, int(out.width * scale)), max(1, int(out.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":  # stay lossy where the source was; everything else becomes lossless PNG
        out.save(buf, "JPEG", quality=95)
        ext = ".jpg"
    else:
        out.save(buf, "PNG")
        ext = ".png"
    return Normalised(buf.getvalue(), ext, out.width, out.height, changed=True)


def normalise_file(path: Path, max_pixels: int | None = None) -> Normalised:
    return normalise(Path(path).read_bytes(), max_pixels)
