"""Tag curation over a project's captions: frequency table, filter, and edits applied to the filtered
images as one undoable step (activation tags first with keep_tokens remembered, prune, merge/replace,
add, dedupe, sort, per-image caption)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraMakerError
from ..project import Project
from .captions import join_tags, read_caption, split_tags, tag_key
from .history import History


def load_captions(project: Project) -> dict[Path, list[str]]:
    """Each image's tags (an empty list when it has no caption)."""
    return {image: split_tags(read_caption(image)) for image in project.images()}


def tag_frequency(captions: dict[Path, list[str]]) -> list[tuple[str, int]]:
    """(tag, number of images carrying it), most frequent first; a tag is shown as first spelled."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for tags in captions.values():
        for key in {tag_key(t): t for t in tags}.keys():
            counts[key] += 1
        for t in tags:
            spelling.setdefault(tag_key(t), t)
    return [(spelling[k], n) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass
class Filter:
    """Which images an edit touches: carrying all (or any) `include` tags and none of `exclude`."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    match_all: bool = True

    def matches(self, tags: list[str]) -> bool:
        keys = {tag_key(t) for t in tags}
        include = [tag_key(t) for t in self.include]
        if include and not (all if self.match_all else any)(k in keys for k in include):
            return False
        return not any(tag_key(t) in keys for t in self.exclude)


def parse_replace(spec: str) -> tuple[list[str], list[str]]:
    """`"old1, old2 => new"` -> (["old1", "old2"], ["new"]); an empty right side removes."""
    if "=>" not in spec:
        raise LoraMakerError(f"replace needs 'old tags => new tags', got {spec!r}")
    old, new = spec.split("=>", 1)
    if not split_tags(old):
        raise LoraMakerError(f"replace has nothing to replace in {spec!r}")
    return split_tags(old), split_tags(new)


def _without(tags: list[str], drop: list[str]) -> list[str]:
    keys = {tag_key(t) for t in drop}
    return [t for t in tags if tag_key(t) not in keys]


def replace(tags: list[str], old: list[str], new: list[str]) -> list[str]:
    """Merge: the first `old` tag present is replaced by `new` in place; the other `old` tags go."""
    old_keys = {tag_key(t) for t in old}
    at = next((i for i, t in enumerate(tags) if tag_key(t) in old_keys), None)
    if at is None:
        return tags
    head = _without(tags[:at], new + old)
    tail = _without(tags[at:], new + old)
    return head + new + tail


def dedupe(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    return [t for t in tags if not (tag_key(t) in seen or seen.add(tag_key(t)))]


def with_activation(tags: list[str], activation: list[str]) -> list[str]:
    return activation + _without(tags, activation)


@dataclass
class Edits:
    """What to do to each selected caption, applied in this order."""

    remove: list[str] = field(default_factory=list)
    replace: list[tuple[list[str], list[str]]] = field(default_factory=list)
    append: list[str] = field(default_factory=list)
    prepend: list[str] = field(default_factory=list)
    dedupe: bool = False
    sort: bool = False
    activation: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"remove {join_tags(self.remove)}" if self.remove else ""]
        parts += [f"replace {join_tags(o)} => {join_tags(n)}" for o, n in self.replace]
        parts += [f"add {join_tags(self.prepend + self.append)}" if self.prepend or self.append else ""]
        parts += ["dedupe" if self.dedupe else "", "sort" if self.sort else ""]
        parts += [f"activation {join_tags(self.activation)}" if self.activation else ""]
        return "; ".join(p for p in parts if p)

    def apply(self, tags: list[str], activation: list[str]) -> list[str]:
        """The edited tags; `activation` are the project's activation tags, which sorting keeps first."""
        tags = _without(tags, self.remove)
        for old, new in self.replace:
            tags = replace(tags, old, new)
        tags = self.prepend + _without(tags, self.prepend + self.append) + self.append
        if self.dedupe:
            tags = dedupe(tags)
        if self.sort:
            first = {tag_key(a): i for i, a in enumerate(activation)}
            tags = sorted(tags, key=lambda t: (first.get(tag_key(t), len(first)), tag_key(t)))
        if self.activation:
            tags = with_activation(tags, self.activation)
        return tags


def activation_tags(project: Project) -> list[str]:
    return list(project.settings().get("dataset", {}).get("activation_tags", []))


def edit_tags(project: Project, edits: Edits, where: Filter | None = None) -> int:
    """Apply `edits` to the captions of the images `where` selects (all by default) as one undoable
    edit; activation tags and keep_tokens are remembered in the settings. Returns images changed."""
    where = where or Filter()
    activation = activation_tags(project)
    if edits.activation:
        activation = edits.activation
    # Pruning an activation tag takes it out of the remembered ones too.
    activation = _without(activation, edits.remove + [t for old, _ in edits.replace for t in old])
    changed = 0
    with History(project).begin(edits.describe() or "tidy captions") as edit:
        for image, tags in load_captions(project).items():
            new = edits.apply(tags, activation) if where.matches(tags) else tags
            if new != tags:  # files the edit doesn't change keep their exact text
                changed += edit.set(Project.caption_path(image), join_tags(new))
        dataset = {"activation_tags": activation, "keep_tokens": len(activation)}
        edit.set(project.settings_path, project.settings_text(dataset=dataset))
    return changed


def set_caption(project: Project, image_name: str, caption: str) -> bool:
    """Per-image edit: replace one image's caption (undoable)."""
    image = project.dataset_dir / image_name
    if image.parent != project.dataset_dir or image not in project.images():
        raise LoraMakerError(f"no image {image_name!r} in project {project.name!r}")
    with History(project).begin(f"edit caption of {image_name}") as edit:
        return edit.set(Project.caption_path(image), caption.strip())
