"""LoRA Maker's headless HTTP API: JSON routes under /lora-maker/v1/ over the same `Studio` the tab uses.

Every route is a thin layer over a Studio or library call, so a request does exactly what the tab's
button does. Long work (scrape, tag, train, grids) starts a background job and answers 202 with the job's
snapshot at once; poll GET /job to follow it. With `credentials` every route needs HTTP Basic auth,
checked like the WebUI's own API (`--api-auth user:password,...`).

    GET  /projects                           [{name, images, captioned}]
    POST /projects {name}                    201 (200 when it existed): the project, as GET /projects/{name}
    GET  /projects/{name}                    {name, images, captioned, activation_tags, keep_tokens,
                                              resumable, loras: [{name, size, mtime}]}
    GET  /projects/{name}/report             {ok, images, captioned, problems: [text], text}
    POST /projects/{name}/scrape/preview     {booru, tags, limit?, api_url?, api_key?, user_id?}
                                             -> {booru, tags, count, limit, planned, skipped: {reason: n},
                                                 notes, browse_url, preview}
    POST /projects/{name}/scrape             the same + {save_tags: true, workers: 4}  -> 202 job
    POST /projects/{name}/dedupe             {threshold: 8, apply: false}
                                             -> {groups: [{keeper, duplicates: [{name, distance, exact}]}],
                                                 moved: n (null without apply)}
    POST /projects/{name}/tag                {tagger?, threshold?, character_threshold?, existing?, ratings?,
                                              blacklist?, batch_size?} (unset: the host's defaults) -> 202 job
    GET  /projects/{name}/tags?include=&exclude=&any=false
                                             -> {images: n matching, tags: [[tag, n], ...]} (most frequent first)
    POST /projects/{name}/tags/edit          {activation, remove, replace: ["a, b => c"], add, dedupe, sort,
                                              include, exclude, any} -> {changed, description}
    POST /projects/{name}/tags/undo          -> {undone: {number, description, time, files} or null}
    PUT  /projects/{name}/captions/{image}   {caption} -> {image, caption, changed}
    GET  /projects/{name}/train/settings     the training settings {key: value} (train_settings.TrainSettings)
    PUT  /projects/{name}/train/settings     a full settings mapping (omitted keys take their defaults),
                                             checked and saved -> the saved settings
    GET  /projects/{name}/train/plan         {line, images, steps_per_epoch, epochs, total_steps, warmup_steps,
                                              warnings, vram: {model (null: none loaded, SD1 assumed),
                                              estimate_gib, summary, verdict (null without a GPU)}}
    POST /projects/{name}/train              {settings: {key: value} overrides for this run, resume: false}
                                             -> 202 job
    GET  /projects/{name}/loras              [{name, size, mtime}]
    GET  /projects/{name}/grids              the saved grids, newest first: [{id, created, stopped, rendered, total,
                                              epochs, weights, grids: [{layer, label, file, size}], recommendation}]
    POST /projects/{name}/grids              {epochs: "all"|"every"|"chosen", k: 2, chosen: [epoch numbers],
                                              weights: [0, 0.5, ...] or "0, 0.5" (default: 0, 0.5-1), prompts:
                                              [[label, prompt]] (default: the main and the flexibility prompt),
                                              seeds: [n] (default: the settings' seed), negative: "", settings:
                                              {sampler, scheduler, steps, cfg_scale, width, height, seed} (unset:
                                              the host's txt2img defaults)} -> 202 job
    GET  /projects/{name}/grids/{grid}       the grid's grid.json (grids.render_grid): {plan, row_labels,
                                              col_labels, grids, cells: [{layer, row, col, epoch, lora, weight,
                                              prompt, negative, seed, file, infotext, score}], recommendation, ...}
    GET  /projects/{name}/grids/{grid}/{file}  a PNG the grid lists: grid-NN.png (one per prompt/seed) or cells/...
    POST /projects/{name}/use-epoch          {epoch, weight}: that epoch becomes NAME.safetensors with `weight` as
                                              the card's preferred weight -> {lora, epoch, weight, files: [written]}
    GET  /job                                the running or last job's snapshot (jobs.Job.snapshot), or null
    POST /job/stop {save: false}             ask the job to stop (saving a resumable state with save) -> job
    POST /job/save-now                       ask the training to save a LoRA now -> job

Lists of tags may be given as lists or comma-separated text (`"a, b"` == `["a", "b"]`). Scrape
creates the project when it doesn't exist yet (like the CLI); every other project route needs it.

Errors are {"error": message}: 400 bad input (a LoraMakerError, a malformed body, a bad name), 401
bad credentials (also "detail", and WWW-Authenticate: Basic), 404 no such project, image or grid, 409 a
job is running (starting another, or editing the dataset of the project it works on), 500 a file
system error. Names never reach outside the projects root: project names pass
`project.validate_name`, image names must be plain file names of existing dataset images, grid ids
must be those the grid list gives, and grid files those their grid.json lists.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from secrets import compare_digest

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, validator
from starlette.exceptions import HTTPException

from .dataset import curate
from .dataset.captions import read_caption, split_tags
from .dataset.dedupe import DEFAULT_THRESHOLD, find_groups, scan, trash_duplicates
from .dataset.history import History
from .dataset.report import dataset_report
from .errors import LoraMakerError
from .grids.plan import DEFAULT_WEIGHTS, RenderSettings, parse_weights
from .grids.render import list_grids, load_grid, use_epoch
from .hosts.host import SD1
from .project import Project, validate_name
from .studio import Studio
from .training import settings as train_settings
from .training import vram

PREFIX = "/lora-maker/v1"
MAX_WORKERS = 16  # parallel downloads a request may ask for


def parse_api_auth(text: str | None) -> dict[str, str] | None:
    """The WebUI's `--api-auth` value ("user:password,user2:password2") as {user: password}; None when
    unset. Split on the first ':', so a password may contain ':' (the WebUI itself refuses that)."""
    if not text:
        return None
    credentials = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        user, sep, password = entry.partition(":")
        if not sep:
            raise LoraMakerError(f"--api-auth entry {entry.strip()!r} needs the form user:password")
        credentials[user.strip()] = password
    return credentials


# ---- request bodies (pydantic 1, the WebUI's) ----


def _tag_list(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [tag for item in items for tag in split_tags(str(item))]


class NewProject(BaseModel):
    name: str


class ScrapeQuery(BaseModel):
    booru: str
    tags: str
    limit: int | None = None
    api_url: str | None = None
    api_key: str = ""
    user_id: str = ""


class ScrapeRequest(ScrapeQuery):
    save_tags: bool = True
    workers: int = 4


class DedupeRequest(BaseModel):
    threshold: int = DEFAULT_THRESHOLD
    apply: bool = False


class TagRequest(BaseModel):
    tagger: str | None = None  # hub repo id or local folder
    threshold: float | None = None
    character_threshold: float | None = None
    existing: str | None = None
    ratings: bool | None = None
    blacklist: list[str] | None = None
    batch_size: int | None = None

    _tags = validator("blacklist", pre=True, allow_reuse=True)(lambda v: None if v is None else _tag_list(v))


class TagEdit(BaseModel):
    activation: list[str] = []
    remove: list[str] = []
    replace: list[str] = []  # "old1, old2 => new"
    add: list[str] = []
    dedupe: bool = False
    sort: bool = False
    include: list[str] = []
    exclude: list[str] = []
    any: bool = False

    _tags = validator("activation", "remove", "add", "include", "exclude", pre=True, allow_reuse=True)(_tag_list)
    _specs = validator("replace", pre=True, allow_reuse=True)(lambda v: [v] if isinstance(v, str) else v)


class Caption(BaseModel):
    caption: str


class TrainRequest(BaseModel):
    settings: dict = {}
    resume: bool = False


class StopRequest(BaseModel):
    save: bool = False


class GridRequest(BaseModel):
    epochs: str = "all"  # grid_plan.EPOCH_MODES
    k: int = 2
    chosen: list[int] = []
    weights: list[float] | None = None
    prompts: list[tuple[str, str]] | None = None
    seeds: list[int] = []
    negative: str = ""
    settings: dict = {}

    _weights = validator("weights", pre=True, allow_reuse=True)(lambda v: parse_weights(v) if isinstance(v, str) else v)


class UseEpoch(BaseModel):
    epoch: int
    weight: float


def render_settings(base: RenderSettings, given: dict) -> RenderSettings:
    """`base` with the `given` settings, each converted to its field's type (a whole number where one
    is expected), unknown keys refused."""
    kinds = {f.name: type(getattr(base, f.name)) for f in fields(RenderSettings)}
    unknown = sorted(set(given) - set(kinds))
    if unknown:
        raise LoraMakerError(f"unknown render settings {', '.join(unknown)}: use {', '.join(kinds)}")
    values = {}
    for key, value in given.items():
        kind = kinds[key]
        try:
            values[key] = kind(value)
            if kind is int and (isinstance(value, bool) or float(value) != values[key]):
                raise ValueError(value)
        except (TypeError, ValueError):
            expected = {int: "a whole number", float: "a number"}.get(kind, "text")
            raise LoraMakerError(f"render setting {key} must be {expected}, got {value!r}") from None
    return replace(base, **values)


# ---- errors ----


class _Refused(Exception):
    """An answer other than 400: `status` with `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _invalid_body(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
        parts.append(f"{where}: {err['msg']}")
    return "bad request: " + "; ".join(parts)


class _Route(APIRoute):
    """A route answering every failure itself as {"error": ...}, whatever handlers the host app has
    (the WebUI's `--api` replaces FastAPI's own and drops the WWW-Authenticate header)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except _Refused as e:
                return _error(e.status, str(e))
            except LoraMakerError as e:
                return _error(400, str(e))
            except RequestValidationError as e:
                return _error(400, _invalid_body(e))
            except HTTPException as e:  # the auth dependency's 401
                return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None), detail=e.detail)
            except OSError as e:
                return _error(500, f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")

        return answer


def _basic_auth(credentials: dict[str, str]):
    """The WebUI API's check: HTTP Basic, passwords compared in constant time."""

    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(given.username)
        # Compared even for an unknown user, so timing doesn't tell which users exist.
        same = compare_digest(given.password.encode("utf-8"), (expected or "").encode("utf-8"))
        if expected is not None and same:
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return auth


# ---- answers ----


def _captioned(project: Project) -> int:
    count = 0
    for image in project.images():
        try:
            count += bool(split_tags(read_caption(image)))
        except LoraMakerError:  # a caption that is not UTF-8 is not a caption the trainer can use
            pass
    return count


def _lora_files(studio: Studio, name: str) -> list[dict]:
    out = []
    for path in studio.saved_loras(name):
        stat = path.stat()
        out.append({"name": path.name, "size": stat.st_size, "mtime": stat.st_mtime})
    return out


def _project_details(studio: Studio, project: Project) -> dict:
    dataset = project.settings().get("dataset", {})
    return {
        "name": project.name, "images": len(project.images()), "captioned": _captioned(project),
        "activation_tags": curate.activation_tags(project), "keep_tokens": int(dataset.get("keep_tokens", 0) or 0),
        "resumable": studio.can_resume(project.name), "loras": _lora_files(studio, project.name),
    }


def add_routes(app: FastAPI, studio: Studio, credentials: dict[str, str] | None = None) -> None:
    """Register the API on `app`; with `credentials` ({user: password}, even empty) every route needs
    one of them by HTTP Basic auth."""
    dependencies = [Depends(_basic_auth(credentials))] if credentials is not None else []
    router = APIRouter(prefix=PREFIX, route_class=_Route, dependencies=dependencies)

    def existing(name: str) -> Project:
        validate_name(name)
        if not Project(studio.projects_root(), name).dataset_dir.is_dir():
            raise _Refused(404, f"no project {name!r}: create it with POST {PREFIX}/projects or scrape into it")
        return studio.project(name)

    def not_busy() -> None:
        job = studio.jobs.current()
        if studio.jobs.busy():
            raise _Refused(409, f"'{job.title}' is still running: stop it (POST {PREFIX}/job/stop) or wait for it")

    def not_working_on(project: Project) -> None:
        """Refuse dataset edits while a job works on the same project (they would race its writes,
        or change a dataset under a training run, which then can't resume)."""
        job = studio.jobs.current()
        if studio.jobs.busy() and job.project == project.name:
            raise _Refused(409, f"'{job.title}' is working on {project.name!r}: wait for it or stop it first")

    def dataset_image(project: Project, name: str) -> str:
        # No separators of any OS, no drive letter or NTFS stream (':'), no '.' or '..'.
        if not name or name in (".", "..") or any(c in name for c in "/\\:\0"):
            raise LoraMakerError(f"invalid image name {name!r}: give the file name of a dataset image, e.g. 001.png")
        image = project.dataset_dir / name
        inside = project.dataset_dir.resolve()
        if (image not in project.images() or image.resolve().parent != inside
                or Project.caption_path(image).resolve().parent != inside):
            raise _Refused(404, f"no image {name!r} in project {project.name!r}")
        return name

    # ---- projects ----

    @router.get("/projects")
    def list_projects():
        projects = (studio.project(name) for name in studio.projects())
        return [{"name": p.name, "images": len(p.images()), "captioned": _captioned(p)} for p in projects]

    @router.post("/projects")
    def create_project(body: NewProject, response: Response):
        name = validate_name(body.name.strip())
        existed = Project(studio.projects_root(), name).dataset_dir.is_dir()
        project = studio.project(name, create=True)
        response.status_code = 200 if existed else 201
        return _project_details(studio, project)

    @router.get("/projects/{name}")
    def get_project(name: str):
        return _project_details(studio, existing(name))

    @router.get("/projects/{name}/report")
    def report(name: str):
        found = dataset_report(existing(name))
        return {"ok": found.ok, "images": found.images, "captioned": found.captioned, "problems": found.problems(),
                "text": found.render()}

    @router.get("/projects/{name}/loras")
    def loras(name: str):
        return _lora_files(studio, existing(name).name)

    # ---- dataset ----

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
        not_busy()
        job = studio.start_scrape(name, body.booru, body.tags, limit=body.limit, save_tags=body.save_tags,
                                  api_key=body.api_key, user_id=body.user_id, api_url=body.api_url,
                                  workers=body.workers)
        return job.snapshot()

    @router.post("/projects/{name}/dedupe")
    def dedupe(name: str, body: DedupeRequest):
        project = existing(name)
        if body.apply:
            not_working_on(project)
        groups = find_groups(scan(project), body.threshold)
        moved = trash_duplicates(project, groups) if body.apply else None
        duplicates = [[{"name": d.name, "distance": d.distance, "exact": d.exact} for d in g.duplicates]
                      for g in groups]
        return {"groups": [{"keeper": g.keeper.name, "duplicates": dups} for g, dups in zip(groups, duplicates)],
                "moved": moved}

    @router.post("/projects/{name}/tag", status_code=202)
    def tag(name: str, body: TagRequest):
        existing(name)
        options = studio.default_tag_options()
        chosen = {"threshold": body.threshold, "character_threshold": body.character_threshold,
                  "existing": body.existing, "include_ratings": body.ratings, "blacklist": body.blacklist,
                  "batch_size": body.batch_size}
        for attr, value in chosen.items():
            if value is not None:
                setattr(options, attr, value)
        options.check()
        not_busy()
        return studio.start_tagging(name, tagger=body.tagger or None, options=options).snapshot()

    @router.get("/projects/{name}/tags")
    def tags(name: str, include: str = "", exclude: str = "", match_any: bool = Query(False, alias="any")):
        where = curate.Filter(split_tags(include), split_tags(exclude), match_all=not match_any)
        selected = {image: t for image, t in curate.load_captions(existing(name)).items() if where.matches(t)}
        return {"images": len(selected), "tags": [[tag, n] for tag, n in curate.tag_frequency(selected)]}

    @router.post("/projects/{name}/tags/edit")
    def edit_tags(name: str, body: TagEdit):
        project = existing(name)
        edits = curate.Edits(remove=body.remove, replace=[curate.parse_replace(s) for s in body.replace],
                             append=body.add, dedupe=body.dedupe, sort=body.sort, activation=body.activation)
        if not edits.describe():
            raise LoraMakerError("nothing to edit: give activation, remove, replace, add, dedupe or sort")
        not_working_on(project)
        where = curate.Filter(body.include, body.exclude, match_all=not body.any)
        return {"changed": curate.edit_tags(project, edits, where), "description": edits.describe()}

    @router.post("/projects/{name}/tags/undo")
    def undo(name: str):
        project = existing(name)
        not_working_on(project)
        edit = History(project).undo()
        if edit is None:
            return {"undone": None}
        return {"undone": {"number": edit.number, "description": edit.description, "time": edit.time,
                           "files": [change.file for change in edit.changes]}}

    @router.put("/projects/{name}/captions/{image}")
    def set_caption(name: str, image: str, body: Caption):
        project = existing(name)
        image = dataset_image(project, image)
        not_working_on(project)
        changed = curate.set_caption(project, image, body.caption)
        return {"image": image, "caption": read_caption(project.dataset_dir / image) or "", "changed": changed}

    # ---- training ----

    @router.get("/projects/{name}/train/settings")
    def get_settings(name: str):
        return train_settings.load(existing(name)).to_dict()

    @router.put("/projects/{name}/train/settings")
    def put_settings(name: str, body: dict):
        project = existing(name)
        settings = train_settings.TrainSettings.from_dict(body)
        settings.validate(studio.model_kind())
        train_settings.save(project, settings)
        return settings.to_dict()

    @router.get("/projects/{name}/train/plan")
    def plan(name: str):
        project = existing(name)
        settings = train_settings.load(project)
        advice = settings.validate(studio.model_kind())
        steps = train_settings.step_arithmetic(len(project.images()), settings)
        kind = studio.model_kind()
        need = vram.estimate(kind or SD1, settings)
        gpu = studio.gpu_memory()
        return {"line": steps.render(), "images": steps.images, "steps_per_epoch": steps.steps_per_epoch,
                "epochs": steps.epochs, "total_steps": steps.total_steps, "warmup_steps": steps.warmup_steps,
                "warnings": steps.warnings + advice,
                "vram": {"model": kind, "estimate_gib": round(need.total_gib, 2), "summary": need.summary(),
                         "verdict": vram.fits(need, gpu[1], settings) if gpu else None}}

    @router.post("/projects/{name}/train", status_code=202)
    def train(name: str, body: TrainRequest | None = None):
        body = body or TrainRequest()
        project = existing(name)
        settings = train_settings.load(project)
        if body.settings:
            settings = settings.replace(**body.settings)
        settings.validate(studio.model_kind())
        not_busy()
        return studio.start_training(name, settings, resume=body.resume).snapshot()

    # ---- grids ----

    def saved_grid(project: Project, grid: str) -> dict:
        """A saved grid's grid.json by id: only ids the grid list gives (folder names) are opened."""
        if not grid or grid in (".", "..") or any(c in grid for c in "/\\:\0"):
            raise LoraMakerError(f"invalid grid id {grid!r}: give an id that GET {PREFIX}/projects/NAME/grids lists")
        entry = next((g for g in list_grids(project) if g["id"] == grid), None)
        if entry is None:
            raise _Refused(404, f"no grid {grid!r} in project {project.name!r}")
        return load_grid(entry["folder"])

    def without_folder(data: dict) -> dict:
        return {k: v for k, v in data.items() if k != "folder"}  # a server path; files are served by name

    @router.get("/projects/{name}/grids")
    def grids(name: str):
        return [without_folder(entry) for entry in list_grids(existing(name))]

    @router.post("/projects/{name}/grids", status_code=202)
    def start_grid(name: str, body: GridRequest | None = None):
        body = body or GridRequest()
        project = existing(name)
        base = (studio.render_defaults() if studio.render_defaults else None) or RenderSettings()
        plan = studio.grid_plan(project.name, [tuple(p) for p in body.prompts] if body.prompts is not None else None,
                                mode=body.epochs, k=body.k, chosen=body.chosen,
                                weights=DEFAULT_WEIGHTS if body.weights is None else body.weights, seeds=body.seeds,
                                negative=body.negative, settings=render_settings(base, body.settings))
        not_busy()
        return studio.start_grid(project.name, plan).snapshot()

    @router.get("/projects/{name}/grids/{grid}")
    def get_grid(name: str, grid: str):
        return without_folder(saved_grid(existing(name), grid))

    @router.get("/projects/{name}/grids/{grid}/{file:path}")
    def grid_file(name: str, grid: str, file: str):
        data = saved_grid(existing(name), grid)
        listed = {g["file"] for g in data.get("grids", [])}
        listed |= {c["file"] for c in data.get("cells", []) if c.get("file")}
        folder = Path(data["folder"])
        path = folder / file
        if file not in listed or not path.is_file() or folder.resolve() not in path.resolve().parents:
            raise _Refused(404, f"no file {file!r} in grid {grid!r}: the grid's files are listed in its grid.json")
        return FileResponse(path, media_type="image/png")

    @router.post("/projects/{name}/use-epoch")
    def use_this_epoch(name: str, body: UseEpoch):
        project = existing(name)
        not_working_on(project)
        written = use_epoch(project, studio.lora_dir(project.name), body.epoch, body.weight)
        studio.files_saved(written)
        return {"lora": f"{project.name}.safetensors", "epoch": body.epoch, "weight": body.weight,
                "files": [path.name for path in written]}

    # ---- the job ----

    def snapshot():
        job = studio.jobs.current()
        return job.snapshot() if job else None

    @router.get("/job")
    def job():
        return snapshot()

    @router.post("/job/stop")
    def stop(body: StopRequest | None = None):
        studio.jobs.stop(save=(body or StopRequest()).save)
        return snapshot()

    @router.post("/job/save-now")
    def save_now():
        studio.jobs.save_now()
        return snapshot()

    app.include_router(router)
