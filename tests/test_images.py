"""Image normalisation on real encoded files: what enters a dataset is always trainable."""

from __future__ import annotations

import io

import pytest
from conftest import image_bytes
from PIL import Image

from lora_trainer_ext.dataset.images import ImageRejected, normalise


def opened(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_plain_jpeg_and_png_are_kept_byte_for_byte():
    for fmt, ext in [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")]:
        data = image_bytes(fmt=fmt)
        out = normalise(data)
        assert (out.data, out.ext, out.changed, out.width, out.height) == (data, ext, False, 96, 64)


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 20, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = normalise(buf.getvalue())
    result = opened(out.data)
    assert out.changed and out.ext == ".png" and result.mode == "RGB"
    assert result.getpixel((5, 5)) == (0, 0, 255)
    assert result.getpixel((35, 5)) == (255, 255, 255)  # transparent red became white, not red or black


def test_palette_with_transparency_and_odd_formats():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, "GIF", transparency=0)
    out = normalise(buf.getvalue())
    assert out.ext == ".png" and opened(out.data).getpixel((1, 1)) == (255, 255, 255)
    tiff = image_bytes(fmt="TIFF")
    assert normalise(tiff).ext == ".png"
    cmyk = image_bytes(fmt="JPEG", mode="CMYK")
    out = normalise(cmyk)
    assert out.ext == ".jpg" and opened(out.data).mode == "RGB"


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 when displayed
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    out = normalise(buf.getvalue())
    assert out.changed and (out.width, out.height) == (20, 60)


def test_big_images_are_downscaled():
    out = normalise(image_bytes(size=(400, 300), fmt="JPEG"), max_pixels=100 * 75)
    assert out.changed and (out.width, out.height) == (100, 75) and out.ext == ".jpg"


@pytest.mark.parametrize(
    "data, reason",
    [
        (image_bytes(fmt="JPEG", size=(200, 200))[:-600], "truncated JPEG"),
        (image_bytes(fmt="PNG", size=(200, 200))[:-300], "truncated PNG"),
        (b"<!DOCTYPE html><html><body>Cloudflare</body></html>", "an HTML page"),
        (b"\x00\x01garbage", "not an image"),
        (b"", "not an image"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        normalise(data)


def test_animation_is_rejected():
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageRejected, match="animated GIF"):
        normalise(buf.getvalue())
