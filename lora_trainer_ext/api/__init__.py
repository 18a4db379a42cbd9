"""LoRA Maker's headless HTTP API: JSON routes under /lora-maker/v1/ over the same `Studio` the tab uses.

Every route is a thin layer over a Studio call (reads may use the libraries' pure helpers), so a request
does exactly what the tab's button does. The routes live by area: projects.py, dataset.py, training.py,
grids.py; bodies.py holds the request bodies, routing.py the error answers and the auth. Long work (scrape, tag, train, grids) starts a background job and answers 202 with the job's
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
                                              buckets, warnings, vram: {model (null: none loaded, SD1 assumed),
                                              estimate_gib, summary, verdict (null without a GPU)}}
    POST /projects/{name}/train              {settings: {key: value} overrides for this run, resume: false,
                                              restart: false (a stopped run is refused unless one is true)}
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
job is running (starting another, or editing the dataset of the project a job of any process works on), 500 a file
system error. Names never reach outside the projects root: project names pass
`project.validate_name`, image names must be plain file names of existing dataset images, grid ids
must be those the grid list gives, and grid files those their grid.json lists.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from ..errors import LoraMakerError
from ..studio import Studio
from . import dataset, grids, projects, training
from .bodies import StopRequest
from .projects import PREFIX
from .routing import Route, basic_auth

__all__ = ["PREFIX", "add_routes", "parse_api_auth"]


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


def add_routes(app: FastAPI, studio: Studio, credentials: dict[str, str] | None = None) -> None:
    """Register the API on `app`; with `credentials` ({user: password}, even empty) every route needs
    one of them by HTTP Basic auth."""
    dependencies = [Depends(basic_auth(credentials))] if credentials is not None else []
    router = APIRouter(prefix=PREFIX, route_class=Route, dependencies=dependencies)
    for routes in (projects, dataset, training, grids):
        routes.add(router, studio)
    add_job_routes(router, studio)
    app.include_router(router)


def add_job_routes(router: APIRouter, studio: Studio) -> None:
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
