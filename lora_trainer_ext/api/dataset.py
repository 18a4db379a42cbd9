"""API routes that build a project's dataset: scrape, dedupe, tag, and caption edits. Every edit goes
through the Studio, which refuses it (409) while a job works on the project."""

from __future__ import annotations

from fastapi import APIRouter, Query

from ..dataset import curate
from ..dataset.captions import read_caption, split_tags
from ..errors import LoraMakerError
from ..project import Project, validate_name
from ..studio import Studio
from .bodies import Caption, DedupeRequest, ScrapeQuery, ScrapeRequest, TagEdit, TagRequest
from .projects import existing
from .routing import Refused

MAX_WORKERS = 16  # parallel downloads a request may ask for


def dataset_image(project: Project, name: str) -> str:
    """`name` if it is the plain file name of one of the project's dataset images, else 400/404."""
    # No separators of any OS, no drive letter or NTFS stream (':'), no '.' or '..'.
    if not name or name in (".", "..") or any(c in name for c in "/\\:\0"):
        raise LoraMakerError(f"invalid image name {name!r}: give the file name of a dataset image, e.g. 001.png")
    image = project.dataset_dir / name
    inside = project.dataset_dir.resolve()
    if (image not in project.images() or image.resolve().parent != inside
            or Project.caption_path(image).resolve().parent != inside):
        raise Refused(404, f"no image {name!r} in project {project.name!r}")
    return name


def add(router: APIRouter, studio: Studio) -> None:
    add_downloads(router, studio)
    add_edits(router, studio)


def add_downloads(router: APIRouter, studio: Studio) -> None:
    @router.post("/projects/{name}/scrape/preview")
    def scrape_preview(name: str, body: ScrapeQuery):
        validate_name(name)
        plan = studio.preview_scrape(name, body.booru, body.tags, limit=body.limit, api_key=body.api_key,
                                     user_id=body.user_id, api_url=body.api_url)
        return {"booru": plan.booru, "tags": plan.tags, "count": plan.count, "limit": plan.limit,
                "planned": len(plan.posts), "skipped": dict(plan.skipped), "notes": list(plan.notes),
                "browse_url": plan.browse_url, "preview": plan.preview()}

    @router.post("/projects/{name}/scrape", status_code=202)
    def scrape(name: str, body: ScrapeRequest):
        validate_name(name)
        if not 1 <= body.workers <= MAX_WORKERS:
            raise LoraMakerError(f"workers must be 1 to {MAX_WORKERS}, got {body.workers}")
        return studio.start_scrape(name, body.booru, body.tags, limit=body.limit, save_tags=body.save_tags,
                                   api_key=body.api_key, user_id=body.user_id, api_url=body.api_url,
                                   workers=body.workers).snapshot()

    @router.post("/projects/{name}/tag", status_code=202)
    def tag(name: str, body: TagRequest):
        existing(studio, name)
        options = studio.default_tag_options()
        chosen = {"threshold": body.threshold, "character_threshold": body.character_threshold,
                  "existing": body.existing, "include_ratings": body.ratings, "blacklist": body.blacklist,
                  "batch_size": body.batch_size}
        for attr, value in chosen.items():
            if value is not None:
                setattr(options, attr, value)
        return studio.start_tagging(name, tagger=body.tagger or None, options=options).snapshot()


def add_edits(router: APIRouter, studio: Studio) -> None:
    @router.post("/projects/{name}/dedupe")
    def dedupe(name: str, body: DedupeRequest):
        project = existing(studio, name)
        groups, _ = studio.find_duplicates(project.name, body.threshold)
        moved = studio.trash_duplicates(project.name, groups) if body.apply else None
        duplicates = [[{"name": d.name, "distance": d.distance, "exact": d.exact} for d in g.duplicates]
                      for g in groups]
        return {"groups": [{"keeper": g.keeper.name, "duplicates": dups} for g, dups in zip(groups, duplicates)],
                "moved": moved}

    @router.get("/projects/{name}/tags")
    def tags(name: str, include: str = "", exclude: str = "", match_any: bool = Query(False, alias="any")):
        where = curate.Filter(split_tags(include), split_tags(exclude), match_all=not match_any)
        selected = {image: t for image, t in curate.load_captions(existing(studio, name)).items() if where.matches(t)}
        return {"images": len(selected), "tags": [[tag, n] for tag, n in curate.tag_frequency(selected)]}

    @router.post("/projects/{name}/tags/edit")
    def edit_tags(name: str, body: TagEdit):
        project = existing(studio, name)
        edits = curate.Edits(remove=body.remove, replace=[curate.parse_replace(s) for s in body.replace],
                             append=body.add, dedupe=body.dedupe, sort=body.sort, activation=body.activation)
        if not edits.describe():
            raise LoraMakerError("nothing to edit: give activation, remove, replace, add, dedupe or sort")
        where = curate.Filter(body.include, body.exclude, match_all=not body.any)
        return {"changed": studio.edit_tags(project.name, edits, where), "description": edits.describe()}

    @router.post("/projects/{name}/tags/undo")
    def undo(name: str):
        edit = studio.undo_edit(existing(studio, name).name)
        if edit is None:
            return {"undone": None}
        return {"undone": {"number": edit.number, "description": edit.description, "time": edit.time,
                           "files": [change.file for change in edit.changes]}}

    @router.put("/projects/{name}/captions/{image}")
    def set_caption(name: str, image: str, body: Caption):
        project = existing(studio, name)
        image = dataset_image(project, image)
        changed = studio.set_caption(project.name, image, body.caption)
        return {"image": image, "caption": read_caption(project.dataset_dir / image) or "", "changed": changed}
