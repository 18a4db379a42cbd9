"""What the Dataset sub-tab shows, as plain data and HTML (no gradio here, so it is unit-tested):
thumbnails cached on disk, pages of images with their marks, the tag table, duplicate groups, the
trash and the edit history, and which optional features this Python can run."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .. import files
from ..dataset.captions import read_caption, split_tags
from ..dataset.curate import Edits, Filter, parse_replace, tag_frequency
from ..dataset.images import ImageRejected, decode_small, flatten
from ..errors import LoraMakerError
from ..project import Project

THUMB_SIDE = 256  # gallery cells are ~150 px; twice that stays sharp on high-density screens
DUPE_SIDE = 128  # duplicate groups are inlined into the page, so smaller
PREVIEW_SIDE = 768  # the per-image editor
PAGE_SIZE = 40  # 5 rows of 8
MARK = "[trash] "  # gallery label prefix of a marked image (style.css dims those thumbnails by it)
TRASH_REASON = "removed in the tab"


# -- thumbnails --------------------------------------------------------------------------------------

def thumbs_dir(project: Project) -> Path:
    return project.cache_dir / "thumbs"


def _unreadable(folder: Path, side: int) -> Path:
    """One grey placeholder for images that don't decode (the Check tab says why)."""
    path = folder / f"unreadable-{side}.png"
    if not path.exists():
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (128, 128, 128)).save(buf, "PNG")
        files.write_bytes(path, buf.getvalue())
    return path


def thumbnail(project: Project, image: Path, side: int = THUMB_SIDE) -> Path:
    """A small JPEG of `image` in <project>/.cache/thumbs/, keyed by name, mtime and size: made once,
    remade when the image changes (the stale one is removed), so the browser never gets originals."""
    folder = thumbs_dir(project)
    try:
        mtime = image.stat().st_mtime_ns
    except FileNotFoundError:
        return _unreadable(folder, side)
    key = hashlib.sha1(image.name.encode("utf-8")).hexdigest()[:16]
    path = folder / f"{key}-{side}-{mtime}.jpg"
    if path.exists():
        return path
    try:
        img, _ = decode_small(image.read_bytes(), side)
    except ImageRejected:
        return _unreadable(folder, side)
    img = flatten(img).convert("RGB")
    img.thumbnail((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    files.write_bytes(path, buf.getvalue())
    for stale in folder.glob(f"{key}-{side}-*.jpg"):
        if stale != path:  # (another request may be making the same thumbnail right now)
            stale.unlink(missing_ok=True)
    return path


def thumbnails(project: Project, images: list[Path], side: int = THUMB_SIDE) -> list[Path]:
    """Thumbnails of `images` in order, made in parallel (Pillow decodes without the GIL)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda image: thumbnail(project, image, side), images))


def data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def counted(n: int, noun: str) -> str:
    """"1 image", "3 images": messages read as sentences."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -- pages of images ---------------------------------------------------------------------------------

def page_count(total: int, size: int = PAGE_SIZE) -> int:
    return max(1, math.ceil(total / size))


def clamp_page(page, total: int, size: int = PAGE_SIZE) -> int:
    """`page` (1-based, any number or None) moved into 1..page_count."""
    try:
        page = int(page)
    except (TypeError, ValueError):
        page = 1
    return min(max(page, 1), page_count(total, size))


def page_of(items: list, page: int, size: int = PAGE_SIZE) -> list:
    start = (clamp_page(page, len(items), size) - 1) * size
    return items[start : start + size]


def caption_text(image: Path) -> str:
    """An image's caption for display: "" when it has none, a note when it can't be read."""
    try:
        return read_caption(image) or ""
    except LoraMakerError as e:
        return f"(unreadable caption: {e})"


def shown_images(project: Project, with_tags: str) -> list[Path]:
    """The images the gallery lists: all, or those whose caption has every tag of `with_tags`."""
    images = project.images()
    tags = split_tags(with_tags)
    if not tags:
        return images
    where = Filter(include=tags)
    return [image for image in images if where.matches(split_tags(caption_text(image)))]


def gallery_label(name: str, caption: str, marked: bool) -> str:
    return f"{MARK if marked else ''}{name} · {caption or '(no caption)'}"


def gallery_items(project: Project, images: list[Path], marked: list[str]) -> list[tuple[str, str]]:
    """(thumbnail path, label) per image, for gr.Gallery (which copies the files to its temp folder)."""
    marks = set(marked)
    thumbs = thumbnails(project, images)
    return [(str(thumb), gallery_label(image.name, caption_text(image), image.name in marks))
            for thumb, image in zip(thumbs, images)]


def page_note(page: int, total: int, size: int = PAGE_SIZE) -> str:
    if not total:
        return "no images"
    first = (page - 1) * size + 1
    return f"page {page} of {page_count(total, size)} · images {first}-{min(first + size - 1, total)} of {total}"


def toggled(marked: list[str], name: str) -> list[str]:
    return [m for m in marked if m != name] if name in marked else [*marked, name]


# -- curation ----------------------------------------------------------------------------------------

def make_filter(include: str, exclude: str, match: str) -> Filter:
    return Filter(split_tags(include), split_tags(exclude), match_all=match != "any")


def frequency_rows(captions: dict[Path, list[str]], where: Filter) -> tuple[list[list], int]:
    """([tag, images] rows over the images `where` selects, most frequent first), images selected."""
    selected = {image: tags for image, tags in captions.items() if where.matches(tags)}
    return [[tag, n] for tag, n in tag_frequency(selected)], len(selected)


def make_edits(activation: str, remove: str, replace: str, add: str, dedupe: bool, sort: bool) -> Edits:
    """The batch edit the form describes; `replace` holds one `old, older => new` rule a line."""
    rules = [parse_replace(line) for line in (replace or "").splitlines() if line.strip()]
    return Edits(remove=split_tags(remove), replace=rules, append=split_tags(add), dedupe=bool(dedupe),
                 sort=bool(sort), activation=split_tags(activation))


def history_html(edits: list, shown: int = 8) -> str:
    """The latest edits, newest first (what Undo takes back, in order)."""
    if not edits:
        return '<p class="lora-maker-note">No edits yet.</p>'
    rows = "".join(
        f"<li><span class=\"lora-maker-note\">#{e.number} {html.escape(e.time)}</span> {html.escape(e.description)}"
        f" <span class=\"lora-maker-note\">({counted(len(e.changes), 'file')})</span></li>"
        for e in reversed(edits[-shown:]))
    more = f'<p class="lora-maker-note">and {len(edits) - shown} older</p>' if len(edits) > shown else ""
    return f'<p class="lora-maker-note">Recent edits, newest first:</p><ol class="lora-maker-history">{rows}</ol>{more}'


# -- duplicates and trash ----------------------------------------------------------------------------

def duplicates_html(project: Project, groups: list, shown: int = 60) -> str:
    """Each group as a row of small thumbnails: the keeper first, then its duplicates with distance."""
    if not groups:
        return '<p class="lora-maker-note">No duplicates at this threshold.</p>'

    def cell(name: str, note: str, keep: bool) -> str:
        src = data_url(thumbnail(project, project.dataset_dir / name, DUPE_SIDE))
        return (f'<figure class="{"keep" if keep else "dupe"}"><img src="{src}" alt="{html.escape(name)}">'
                f"<figcaption>{html.escape(note)}<br>{html.escape(name)}</figcaption></figure>")

    rows = []
    for group in groups[:shown]:
        cells = [cell(group.keeper.name, f"keep {group.keeper.width}x{group.keeper.height}", True)]
        cells += [cell(d.name, "exact copy" if d.exact else f"{d.distance} bits apart", False) for d in group.duplicates]
        rows.append(f'<div class="lora-maker-dupe-group">{"".join(cells)}</div>')
    dupes = sum(len(g.duplicates) for g in groups)
    head = (f"<p>{counted(len(groups), 'group')}: {counted(dupes, 'duplicate')} would go to the trash "
            "(the first of each row stays).</p>")
    more = f'<p class="lora-maker-note">and {counted(len(groups) - shown, "more group")}</p>' if len(groups) > shown else ""
    return head + "".join(rows) + more


def trash_html(entries: list) -> str:
    if not entries:
        return '<p class="lora-maker-note">The trash is empty.</p>'
    rows = "".join(f"<tr><td>{html.escape(e.name)}</td><td>{html.escape(e.reason)}</td><td>{html.escape(e.time)}</td></tr>"
                   for e in entries)
    return f'<table class="lora-maker-table"><tr><th>file</th><th>why</th><th>when</th></tr>{rows}</table>'


# -- optional dependencies ---------------------------------------------------------------------------

def need_imagehash() -> None:
    try:
        import imagehash  # noqa: F401
    except ImportError as e:
        raise LoraMakerError("finding duplicates needs imagehash: pip install imagehash in the WebUI's Python "
                             "environment (restarting the WebUI lets the extension's installer add it)") from e


def edit_stamp(part: str) -> str:
    """A new value for the sub-tab's hidden "edited" box: `part` (review, curate, ...) changed the
    dataset, so the other parts refresh what they show."""
    return f"{part}:{time.monotonic_ns()}"


def edited_elsewhere(stamp: str | None, part: str) -> bool:
    return bool(stamp) and not stamp.startswith(f"{part}:")


def undo_message(edit) -> str:
    """What an undo (`Studio.undo_edit`'s `history.Edit`, or None) did."""
    if edit is None:
        return "Nothing to undo."
    return f"Undid #{edit.number} '{edit.description}' ({counted(len(edit.changes), 'file')} restored)."
