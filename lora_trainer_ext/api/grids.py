"""API routes of the test grids: render one, list and read them, serve their PNGs, use an epoch."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import LoraMakerError
from ..grids.plan import DEFAULT_WEIGHTS, RenderSettings
from ..grids.render import list_grids, load_grid
from ..project import Project
from ..studio import Studio
from .bodies import GridRequest, UseEpoch, render_settings
from .projects import PREFIX, existing
from .routing import Refused


def saved_grid(project: Project, grid: str) -> dict:
    """A saved grid's grid.json by id: only ids the grid list gives (folder names) are opened."""
    if not grid or grid in (".", "..") or any(c in grid for c in "/\\:\0"):
        raise LoraMakerError(f"invalid grid id {grid!r}: give an id that GET {PREFIX}/projects/NAME/grids lists")
    entry = next((g for g in list_grids(project) if g["id"] == grid), None)
    if entry is None:
        raise Refused(404, f"no grid {grid!r} in project {project.name!r}")
    return load_grid(entry["folder"])


def without_folder(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "folder"}  # a server path; files are served by name


def add(router: APIRouter, studio: Studio) -> None:
    @router.get("/projects/{name}/grids")
    def grids(name: str):
        return [without_folder(entry) for entry in list_grids(existing(studio, name))]

    @router.post("/projects/{name}/grids", status_code=202)
    def start_grid(name: str, body: GridRequest | None = None):
        body = body or GridRequest()
        project = existing(studio, name)
        base = (studio.render_defaults() if studio.render_defaults else None) or RenderSettings()
        plan = studio.grid_plan(project.name, [tuple(p) for p in body.prompts] if body.prompts is not None else None,
                                mode=body.epochs, k=body.k, chosen=body.chosen,
                                weights=DEFAULT_WEIGHTS if body.weights is None else body.weights, seeds=body.seeds,
                                negative=body.negative, settings=render_settings(base, body.settings))
        return studio.start_grid(project.name, plan).snapshot()

    @router.get("/projects/{name}/grids/{grid}")
    def get_grid(name: str, grid: str):
        return without_folder(saved_grid(existing(studio, name), grid))

    @router.get("/projects/{name}/grids/{grid}/{file:path}")
    def grid_file(name: str, grid: str, file: str):
        data = saved_grid(existing(studio, name), grid)
        listed = {g["file"] for g in data.get("grids", [])}
        listed |= {c["file"] for c in data.get("cells", []) if c.get("file")}
        folder = Path(data["folder"])
        path = folder / file
        if file not in listed or not path.is_file() or folder.resolve() not in path.resolve().parents:
            raise Refused(404, f"no file {file!r} in grid {grid!r}: the grid's files are listed in its grid.json")
        return FileResponse(path, media_type="image/png")

    @router.post("/projects/{name}/use-epoch")
    def use_this_epoch(name: str, body: UseEpoch):
        project = existing(studio, name)
        written = studio.use_epoch(project.name, body.epoch, body.weight)
        return {"lora": f"{project.name}.safetensors", "epoch": body.epoch, "weight": body.weight,
                "files": [path.name for path in written]}
