"""API routes of the projects themselves: list, create, details, report, LoRA files."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..dataset import curate
from ..dataset.captions import read_caption, split_tags
from ..dataset.report import dataset_report
from ..errors import LoraMakerError
from ..project import Project, validate_name
from ..studio import Studio
from .bodies import NewProject
from .routing import Refused

PREFIX = "/lora-maker/v1"


def existing(studio: Studio, name: str) -> Project:
    """Project `name`, or 404 (every route but scrape's needs it to exist)."""
    validate_name(name)
    if not Project(studio.projects_root(), name).dataset_dir.is_dir():
        raise Refused(404, f"no project {name!r}: create it with POST {PREFIX}/projects or scrape into it")
    return studio.project(name)


def captioned(project: Project) -> int:
    count = 0
    for image in project.images():
        try:
            count += bool(split_tags(read_caption(image)))
        except LoraMakerError:  # a caption that is not UTF-8 is not a caption the trainer can use
            pass
    return count


def lora_files(studio: Studio, name: str) -> list[dict]:
    out = []
    for path in studio.saved_loras(name):
        stat = path.stat()
        out.append({"name": path.name, "size": stat.st_size, "mtime": stat.st_mtime})
    return out


def details(studio: Studio, project: Project) -> dict:
    dataset = project.settings().get("dataset", {})
    return {
        "name": project.name, "images": len(project.images()), "captioned": captioned(project),
        "activation_tags": curate.activation_tags(project), "keep_tokens": int(dataset.get("keep_tokens", 0) or 0),
        "resumable": studio.can_resume(project.name), "loras": lora_files(studio, project.name),
    }


def add(router: APIRouter, studio: Studio) -> None:
    @router.get("/projects")
    def list_projects():
        projects = (studio.project(name) for name in studio.projects())
        return [{"name": p.name, "images": len(p.images()), "captioned": captioned(p)} for p in projects]

    @router.post("/projects")
    def create_project(body: NewProject, response: Response):
        name = validate_name(body.name.strip())
        existed = Project(studio.projects_root(), name).dataset_dir.is_dir()
        project = studio.project(name, create=True)
        response.status_code = 200 if existed else 201
        return details(studio, project)

    @router.get("/projects/{name}")
    def get_project(name: str):
        return details(studio, existing(studio, name))

    @router.get("/projects/{name}/report")
    def report(name: str):
        found = dataset_report(existing(studio, name))
        return {"ok": found.ok, "images": found.images, "captioned": found.captioned, "problems": found.problems(),
                "text": found.render()}

    @router.get("/projects/{name}/loras")
    def loras(name: str):
        return lora_files(studio, existing(studio, name).name)
