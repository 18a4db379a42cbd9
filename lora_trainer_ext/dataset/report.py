"""The dataset report: what would trip up training, found before training starts (images without
captions, captions without images, corrupt or unsupported files, two images sharing one caption),
and the resolution and aspect-ratio spread the trainer's buckets will see."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from ..errors import LoraMakerError
from ..progress import Progress
from ..project import Project
from .captions import read_caption, split_tags
from .dedupe import scan
from .images import IMAGE_EXTS

SMALL_SIDE = 512  # shorter side below this gets upscaled by the trainer's buckets, which blurs
# Aspect ratio (width / height) classes, named as a user would describe them.
_ASPECTS = [(0.0, "tall (< 2:3)"), (0.66, "portrait (2:3 to 4:5)"), (0.8, "square-ish (4:5 to 5:4)"),
            (1.25, "landscape (5:4 to 3:2)"), (1.5, "wide (> 3:2)")]


@dataclass
class Report:
    images: int = 0
    captioned: int = 0
    uncaptioned: list[str] = field(default_factory=list)  # no .txt, or an empty one
    orphan_captions: list[str] = field(default_factory=list)  # .txt without an image
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    unsupported: list[str] = field(default_factory=list)  # files the trainer will not read
    shared_captions: list[list[str]] = field(default_factory=list)  # images with the same stem
    small: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    aspects: Counter = field(default_factory=Counter)
    tags_per_caption: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.uncaptioned or self.orphan_captions or self.corrupt or self.shared_captions) and self.images > 0

    def problems(self) -> list[str]:
        out = []
        if not self.images:
            out.append("the dataset has no images")
        for title, names in [
            ("images without a caption", self.uncaptioned),
            ("captions without an image", self.orphan_captions),
            ("corrupt images", [f"{n}: {why}" for n, why in self.corrupt]),
            ("files the trainer ignores", self.unsupported),
            ("images sharing one caption file (rename one)", [" + ".join(g) for g in self.shared_captions]),
            (f"images smaller than {SMALL_SIDE} px on the short side (they will be upscaled)", self.small),
        ]:
            if names:
                shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
                out.append(f"{len(names)} {title}: {shown}")
        return out

    def render(self) -> str:
        lines = [f"{self.images} images, {self.captioned} with captions"]
        if self.sizes:
            shorts = [min(s) for s in self.sizes]
            pixels = [w * h / 1e6 for w, h in self.sizes]
            lines.append(
                f"short side: min {min(shorts)}, median {int(statistics.median(shorts))}, max {max(shorts)} px; "
                f"megapixels: min {min(pixels):.2f}, median {statistics.median(pixels):.2f}, max {max(pixels):.2f}"
            )
            lines.append("aspect ratios: " + ", ".join(f"{name} {self.aspects[name]}" for _, name in _ASPECTS if self.aspects[name]))
        if self.tags_per_caption:
            t = self.tags_per_caption
            lines.append(f"tags per caption: min {min(t)}, median {int(statistics.median(t))}, max {max(t)}")
        problems = self.problems()
        lines += ["problems:"] + [f"  - {p}" for p in problems] if problems else ["no problems found"]
        return "\n".join(lines)


def _aspect_class(width: int, height: int) -> str:
    ratio = width / height
    return [name for lower, name in _ASPECTS if ratio >= lower][-1]


def dataset_report(project: Project, progress: Progress | None = None) -> Report:
    report = Report()
    entries = [p for p in project.dataset_dir.iterdir() if p.is_file()] if project.dataset_dir.is_dir() else []
    stems: dict[str, list[str]] = {}
    for p in entries:
        if p.suffix.lower() in IMAGE_EXTS:
            stems.setdefault(p.stem, []).append(p.name)
        elif p.suffix.lower() != ".txt" and not p.name.startswith("."):
            report.unsupported.append(p.name)
    report.shared_captions = sorted(sorted(names) for names in stems.values() if len(names) > 1)
    report.orphan_captions = sorted(p.name for p in entries if p.suffix.lower() == ".txt" and p.stem not in stems)
    report.unsupported.sort()

    for info in scan(project, progress):  # decodes every image once (cached), so damage is found
        report.images += 1
        if info.error:
            report.corrupt.append((info.name, info.error))
            continue
        report.sizes.append((info.width, info.height))
        report.aspects[_aspect_class(info.width, info.height)] += 1
        if min(info.width, info.height) < SMALL_SIDE:
            report.small.append(info.name)
    for image in project.images():
        try:
            tags = split_tags(read_caption(image))
        except LoraMakerError as e:  # a caption that is not UTF-8
            report.corrupt.append((Project.caption_path(image).name, str(e)))
            continue
        if tags:
            report.captioned += 1
            report.tags_per_caption.append(len(tags))
        else:
            report.uncaptioned.append(image.name)
    return report
