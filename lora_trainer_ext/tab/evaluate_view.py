"""What the Test sub-tab shows of a saved grid, as plain data and HTML (no gradio here): the grid
picker's labels, the layers, which cell a click hit, a cell's details, the score table and the
recommendation."""

from __future__ import annotations

import html
import io
import warnings
from dataclasses import fields
from pathlib import Path

from PIL import Image

from .. import files
from ..errors import LoraMakerError
from ..grids.image import cell_in, read_grid
from ..grids.plan import format_weight
from ..grids.recommend import VERDICTS
from ..grids.render import list_grids, load_grid
from ..grids.scoring import Score, sort_scores
from ..project import Project

PREVIEW_WIDTH = 2048  # the view is ~800 px wide: twice that stays sharp on high-density screens
SCORE_HEADERS = ["prompt", "epoch", "weight", "likeness", "flexibility", "overcooked", "merit", "problem"]
SCORE_TYPES = ["str", "number", "number", "number", "number", "number", "number", "str"]


def _numbers(values) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    values = sorted(values)
    runs: list[list] = []
    for v in values:
        if runs and isinstance(v, int) and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def grid_label(entry: dict) -> str:
    """A saved grid in the picker: its id (the folder name) first, then what it holds."""
    weights = ", ".join(format_weight(w) for w in entry.get("weights", []))
    done = (f"stopped at {entry.get('rendered')}/{entry.get('total')} images" if entry.get("stopped")
            else f"{entry.get('rendered')} images")
    return f"{entry['id']}  (epochs {_numbers(entry.get('epochs', []))}; weights {weights}; {done})"


def grid_id(label: str | None) -> str:
    return (label or "").split(" ", 1)[0]


def grid_labels(project: Project) -> list[str]:
    """The project's saved grids, newest first."""
    return [grid_label(entry) for entry in list_grids(project)]


def open_grid(project: Project, label_or_id: str) -> dict:
    """A saved grid of `project` by id (or its picker label); only ids of listed grids are opened,
    so no name reaches outside the project's grids folder."""
    wanted = grid_id(label_or_id)
    entry = next((g for g in list_grids(project) if g["id"] == wanted), None)
    if entry is None:
        raise LoraMakerError(f"no grid {wanted!r} in project {project.name!r}: render one, or pick another")
    return load_grid(entry["folder"])


def layer_labels(data: dict) -> list[str]:
    """One label per grid image (a prompt or seed of the third axis)."""
    return [g["label"] for g in data.get("grids", [])]


def layer_index(data: dict, label: str | None) -> int:
    """The position of grid image `label` (the first when it is not one of this grid's)."""
    labels = layer_labels(data)
    return labels.index(label) if label in labels else 0


def layer_image(data: dict, layer: int) -> Path | None:
    entries = data.get("grids", [])
    return Path(data["folder"]) / entries[layer]["file"] if 0 <= layer < len(entries) else None


def preview_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size the page shows a grid of `size` at: its own, or PREVIEW_WIDTH wide."""
    width, height = size
    return (width, height) if width <= PREVIEW_WIDTH else (PREVIEW_WIDTH, max(1, round(height * PREVIEW_WIDTH / width)))


def grid_preview(project: Project, data: dict, layer: int) -> Path | None:
    """What the page shows of grid image `layer`: the PNG itself when it is at most PREVIEW_WIDTH
    wide, else a JPEG of that width made once into the project's cache (the page gets images inline,
    and a grid of 512 px cells is tens of megabytes as PNG)."""
    image = layer_image(data, layer)
    if image is None:
        return None
    size = tuple(data["grids"][layer]["size"])
    shown = preview_size(size)
    if shown == size:
        return image
    target = (project.cache_dir / "grid-previews"
              / f"{Path(data['folder']).name}-{image.stem}-{image.stat().st_mtime_ns}.jpg")
    if not target.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # grids of big cells are big
            with Image.open(image) as full:
                small = full.convert("RGB").resize(shown, Image.LANCZOS)
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=90)
        files.write_bytes(target, buffer.getvalue())
    return target


def clicked_cell(data: dict, layer: int, x: float, y: float) -> dict | None:
    """The cell under the pixel (x, y) of grid image `layer` as the page shows it (`grid_preview`),
    from the description the PNG carries; None in the labels, the gaps or an unrendered cell."""
    image = layer_image(data, layer)
    if image is None:
        return None
    _, description = read_grid(image)
    size = data["grids"][layer]["size"]
    shown = preview_size(tuple(size))
    hit = cell_in(description, x * size[0] / shown[0], y * size[1] / shown[1])
    if hit is None:
        return None
    return find_cell(data, description.get("layer", data["grids"][layer]["layer"]), *hit)


def find_cell(data: dict, layer: int, row: int, col: int) -> dict | None:
    cell = next((c for c in data.get("cells", []) if (c["layer"], c["row"], c["col"]) == (layer, row, col)), None)
    return cell if cell and cell.get("file") else None


def cell_image(data: dict, cell: dict) -> Path:
    return Path(data["folder"]) / cell["file"]


def _percent(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def cell_html(cell: dict) -> str:
    """The picked cell: epoch, weight and its scores, with what the tagger missed."""
    weight = "no LoRA (baseline)" if not cell["weight"] else f"weight {format_weight(cell['weight'])}"
    head = (f"epoch {cell['epoch']}, {weight}" if cell["weight"] else weight)
    score = cell.get("score") or {}
    facts = [f"likeness {_percent(score.get('likeness'))}", f"flexibility {_percent(score.get('flexibility'))}",
             f"overcooked {_percent(score.get('overcooked'))}", f"merit {_percent(score.get('merit'))}"]
    if score.get("problem"):
        facts.append(f"broken: {score['problem']}")
    missing = [("core tags not seen", score.get("missing_core")),
               ("asked for, not seen", score.get("missing_requested"))]
    notes = "".join(f"<li>{html.escape(what)}: {html.escape(', '.join(tags))}</li>" for what, tags in missing if tags)
    return (f'<div class="lora-maker-test-cell" data-epoch="{cell["epoch"]}" data-weight="{cell["weight"]}">'
            f'<b>{html.escape(head)}</b><span class="lora-maker-note"> · {" · ".join(facts)}</span>'
            + (f'<ul class="lora-maker-note">{notes}</ul>' if notes else "") + "</div>")


def scores(data: dict) -> list[Score]:
    """The LoRA cells' scores (the baseline column is the reference, not a candidate)."""
    names = [f.name for f in fields(Score)]
    return [Score(**{k: c["score"][k] for k in names}) for c in data.get("cells", [])
            if c.get("score") and c["weight"]]


def score_rows(data: dict) -> list[list]:
    """The score table, best merit first (the table sorts by any column on a header click)."""
    labels = layer_labels_by_layer(data)

    def num(value):
        return None if value is None else round(value, 2)

    return [[labels.get(s.layer, str(s.layer)), s.epoch, s.weight, num(s.likeness), num(s.flexibility),
             num(s.overcooked), num(s.merit), s.problem] for s in sort_scores(scores(data), "merit")]


def layer_labels_by_layer(data: dict) -> dict[int, str]:
    return {int(i): label for i, (label, _, _) in enumerate(data.get("plan", {}).get("layers", []))}


def recommendation_html(data: dict) -> str:
    rec = data.get("recommendation") or {}
    if not rec:
        return ""
    if rec.get("epoch") is not None:
        tag = f"<lora:{rec.get('lora')}:{format_weight(rec['weight'])}>"
        head = (f"Recommended: epoch {rec['epoch']} at weight {format_weight(rec['weight'])} "
                f'<code>{html.escape(tag)}</code>')
    else:
        head = "No recommendation"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in rec.get("reasons", []))
    verdicts = "".join(
        f'<span class="lora-maker-test-verdict lora-maker-test-{v if v in VERDICTS else "other"}">'
        f"epoch {html.escape(str(e))}: {html.escape(str(v))}</span>"
        for e, v in sorted(rec.get("verdicts", {}).items(), key=lambda kv: int(kv[0])))
    stopped = ('<p class="lora-maker-note">This grid was stopped before every image was rendered: '
               "the scores cover the rendered cells only.</p>" if data.get("stopped") else "")
    return (f'<div class="lora-maker-test-rec"><p class="lora-maker-test-rec-head">{head}</p>'
            f"<ul>{reasons}</ul><div>{verdicts}</div>{stopped}</div>")


def recommended_cell(data: dict) -> dict | None:
    """The recommended epoch and weight's cell in the first layer."""
    rec = data.get("recommendation") or {}
    if rec.get("epoch") is None:
        return None
    return next((c for c in data.get("cells", []) if c["epoch"] == rec["epoch"] and c["weight"] == rec["weight"]
                 and c.get("file")), None)


def saved_html(numbers: list[str], folder: Path) -> str:
    text = f"Saved epochs: {', '.join(numbers)}" if numbers else "No LoRA saved yet: train first"
    return f'<p class="lora-maker-note">{text} (in <code>{html.escape(str(folder))}</code>)</p>'


def files_html(files: list[Path], folder: Path) -> str:
    if not files:
        return f'<p class="lora-maker-note">No LoRA saved yet in {html.escape(str(folder))}: train first.</p>'
    rows = "".join(
        f"<tr><td>{html.escape(p.name)}</td><td>{p.stat().st_size / 2**20:.1f} MB</td>"
        f"<td><code>&lt;lora:{html.escape(p.stem)}:1&gt;</code></td></tr>" for p in files)
    return (f'<p class="lora-maker-note">{html.escape(str(folder))}</p><table class="lora-maker-table">'
            f"<tr><th>file</th><th>size</th><th>in a prompt</th></tr>{rows}</table>")
