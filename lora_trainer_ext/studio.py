"""LoRA Maker as a running service: the projects, the one background job, and the model it trains on.

The tab (`tab/`), the HTTP API (`api/`) and the CLI are faces of one `Studio`: every user action, quick
(a caption edit, the training plan) or long (a job), is a method here, so a click, a request and a
command do exactly the same thing and refuse the same things. The WebUI adapter (`webui/studio.py`) and
the standalone app (`app.py`, also the CLI's) each build one from what their host provides: the model,
the GPU lock, the Lora folder and the settings.

The busy policy: one job at a time, and no edit of a project's dataset while a job (of this process or
another: `Project.claim`) works on that project; both refusals are `Busy`, with one message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from .errors import Busy, LoraMakerError
from .hosts.host import Host, gpu_memory
from .jobs import Job, JobProgress, JobRunner
from .paths import OPT_DEFAULT_PRESET, OPT_DEFAULT_TAGGER, OPT_TAG_CHARACTER_THRESHOLD, OPT_TAG_THRESHOLD
from .progress import Status
from .project import Project, busy_message, list_projects
from .training import settings as train_settings
from .training.settings import TrainSettings


@dataclass
class Studio:
    projects_root: Callable[[], Path]
    model_cache: Callable[[], Path | None]
    # The model to train on (for a run of these settings, or None), ready for training, put back exactly as
    # it was on exit.
    open_host: Callable[[TrainSettings | None], ContextManager[Host]]
    # SD1/SD2/SDXL of the model training would use, or None when none is loaded (cheap: no loading).
    model_kind: Callable[[], str | None]
    lora_dir: Callable[[str], Path]  # where a project's LoRA files go
    jobs: JobRunner = field(default_factory=JobRunner)
    files_saved: Callable[[list[Path]], None] = lambda files: None  # e.g. refresh the WebUI's Lora list
    gpu_memory: Callable[[], tuple[float, float] | None] = gpu_memory  # free, total GiB of the training GPU
    option: Callable[[str], Any] = lambda key: None  # a setting of the host (the WebUI's Settings page)
    # What renders grid cells (the WebUI's txt2img, or the standalone sampler), inside the GPU job.
    open_renderer: Callable[[], ContextManager] | None = None
    # The render settings grids start from (the WebUI's txt2img defaults there).
    render_defaults: Callable[[], Any] | None = None
    # Binds a "Send to txt2img" button to a textbox holding an infotext (the WebUI's paste buttons).
    paste_to_txt2img: Callable[[Any, Any], None] | None = None
    # Why this host can neither train nor render grids (a part of the WebUI they rely on is gone), or None.
    host_problem: Callable[[], str | None] = lambda: None
    # What the plan should say about the loaded model (e.g. a v-prediction model the host samples as eps).
    model_notes: Callable[[], list[str]] = lambda: []
    last_project: str | None = None  # the project picked last, shown again when the page is reloaded

    # ---- projects ----

    def projects(self) -> list[str]:
        return list_projects(self.projects_root())

    def project(self, name: str, create: bool = False) -> Project:
        """The project `name` (validated: names never reach outside the projects root)."""
        return Project.open(self.projects_root(), name, create=create)

    def editable(self, name: str) -> Project:
        """Project `name`, or Busy while a job works on it (an edit would race the job's writes, or
        change a dataset under a training run, which then could not resume)."""
        project = self.project(name)
        job = self.jobs.current()
        holder = f"'{job.title}'" if self.jobs.busy() and job.project == name else project.claimed_by()
        if holder:
            raise Busy(busy_message(holder, name))
        return project

    # ---- project edits (each refused while a job works on the project) ----

    def edit_tags(self, name: str, edits, where=None) -> int:
        """Apply `curate.Edits` to the captions `where` (a `curate.Filter`, default all) selects, as one
        undoable step; returns how many captions changed."""
        from .dataset import curate

        return curate.edit_tags(self.editable(name), edits, where or curate.Filter())

    def set_caption(self, name: str, image: str, caption: str) -> bool:
        from .dataset import curate

        return curate.set_caption(self.editable(name), image, caption)

    def undo_edit(self, name: str):
        """Undo the latest caption edit (`history.Edit`, or None when there is none)."""
        from .dataset.history import History

        return History(self.editable(name)).undo()

    def trash_images(self, name: str, images: list[str], reason: str) -> list:
        """Move dataset images (by file name) and their captions to the project's trash."""
        from .dataset.trash import move_to_trash

        project = self.editable(name)
        return move_to_trash(project, {project.dataset_dir / image: reason for image in images})

    def restore_trash(self, name: str, names: list[str] | None = None) -> list:
        """Put trashed images back (`names`, or everything)."""
        from .dataset.trash import restore

        return restore(self.editable(name), names)

    def find_duplicates(self, name: str, threshold: int, progress=None) -> tuple[list, list]:
        """(duplicate groups, every image's scan) of project `name` at `threshold` bits."""
        from .dataset.dedupe import find_groups, scan

        infos = scan(self.project(name), progress)
        return find_groups(infos, threshold), infos

    def trash_duplicates(self, name: str, groups: list) -> int:
        from .dataset.dedupe import trash_duplicates

        return trash_duplicates(self.editable(name), groups)

    # ---- defaults from the host's settings ----

    def default_tagger(self) -> str:
        from .dataset.tagger import DEFAULT_MODEL

        return self.option(OPT_DEFAULT_TAGGER) or DEFAULT_MODEL

    def default_tag_options(self):
        from .dataset.tagger import TagOptions

        options = TagOptions()
        for key, attr in ((OPT_TAG_THRESHOLD, "threshold"), (OPT_TAG_CHARACTER_THRESHOLD, "character_threshold")):
            value = self.option(key)
            if value not in (None, ""):
                setattr(options, attr, float(value))
        return options

    def default_preset(self) -> str:
        return self.option(OPT_DEFAULT_PRESET) or ""

    # ---- jobs ----

    def preview_scrape(self, name: str, booru: str, tags: str, limit: int | None = None, api_key: str = "",
                       user_id: str = "", api_url: str | None = None):
        """Count the query's posts and list what a download would fetch (no image is downloaded).
        Without `api_key`/`user_id` the stored credentials are used (environment, WebUI settings)."""
        from .dataset.boorus import make_client
        from .dataset.scrape import plan

        client = make_client(booru, api_url=api_url or None, api_key=api_key, user_id=user_id)
        return plan(self.project(name, create=True), client, tags, limit=limit)

    def start_scrape(self, name: str, booru: str, tags: str, limit: int | None = None, save_tags: bool = True,
                     api_key: str = "", user_id: str = "", api_url: str | None = None, workers: int = 4) -> Job:
        """Download the query's images (at most `limit` in the dataset) into project `name`."""
        from .dataset.boorus import make_client
        from .dataset.http import Http
        from .dataset.scrape import download, plan

        project = self.project(name, create=True)

        def work(control, on_status):
            progress = JobProgress(control, on_status)
            client = make_client(booru, api_url=api_url or None, api_key=api_key, user_id=user_id,
                                 http=Http(should_stop=progress.should_stop))
            todo = plan(project, client, tags, limit=limit, progress=progress)
            return download(project, todo, workers=workers, save_tags=save_tags, progress=progress)

        return self._start(f"scrape {name}", project, work, kind="scrape", gpu=False)

    def start_tagging(self, name: str, tagger: str | None = None, options=None) -> Job:
        """Caption project `name` with a WD tagger (downloaded into the model cache once)."""
        from .dataset.tagger import load_tagger, tag_project

        project = self.project(name)
        options = options or self.default_tag_options()
        options.check()

        def work(control, on_status):
            progress = JobProgress(control, on_status)
            model = load_tagger(tagger or self.default_tagger(), cache_dir=self.model_cache(), progress=progress)
            return tag_project(project, model, options, progress)

        return self._start(f"tag {name}", project, work, kind="tag")

    def start_captioning(self, name: str, model: str | None = None, existing: str = "skip") -> Job:
        """Caption project `name` in sentences with BLIP (for photos)."""
        from .dataset.captioner import caption_project, load_blip

        project = self.project(name)

        def work(control, on_status):
            progress = JobProgress(control, on_status)
            captioner = load_blip(model, cache_dir=self.model_cache(), progress=progress)
            return caption_project(project, captioner, existing=existing, progress=progress)

        return self._start(f"caption {name}", project, work, kind="caption")

    # ---- training ----

    def training_settings(self, name: str) -> TrainSettings:
        """Project `name`'s settings for the loaded model: what the user changed, over its family's defaults."""
        return train_settings.load(self.project(name), self.model_kind())

    def default_training_settings(self) -> TrainSettings:
        return train_settings.defaults(self.model_kind())

    def save_training_settings(self, name: str, settings: TrainSettings) -> TrainSettings:
        """Check `settings` against the loaded model and keep what differs from its family's defaults."""
        kind = self.model_kind()
        settings.validate(kind)
        train_settings.save(self.project(name), settings, kind)
        return settings

    def training_plan(self, name: str | None, settings: TrainSettings | None = None):
        """The step arithmetic and VRAM estimate of training project `name` (None: only the estimate)
        with `settings` (its saved ones by default) on the host's model: `training.plan.TrainingPlan`."""
        from .training.plan import training_plan

        project = self.project(name) if name else None
        kind = self.model_kind()
        if settings is None:
            settings = train_settings.load(project, kind) if project else train_settings.defaults(kind)
        return training_plan(project, settings, kind, self.gpu_memory(), self.model_notes())

    def start_training(self, name: str, settings: TrainSettings | None = None, resume: bool = False,
                       grid: bool = False, restart: bool = False) -> Job:
        """Train project `name` (its saved settings unless `settings` are given) on the host's model;
        with `grid`, render the default epoch x weight grid in the same job when training ends. A stopped
        run is continued with `resume`, or discarded with `restart`; neither refuses to start."""
        from .training.state import has_state
        from .training.trainer import train

        self._refuse_host_problem()
        project = self.project(name)
        kind = self.model_kind()
        settings = settings if settings is not None else train_settings.load(project, kind)
        settings.validate(kind)  # refused now, not as a failed job
        if not resume and not restart and has_state(project):
            raise LoraMakerError(f"{name!r} has a stopped run: resume it (Resume, --resume) or start over, which "
                                 "discards it (Start over, --restart)")
        lora_dir = self.lora_dir(name)

        def work(control, on_status):
            with self.open_host(settings) as host:
                try:
                    result = train(project, host, settings, lora_dir, resume=resume, control=control,
                                   on_status=on_status, progress=JobProgress(control, on_status))
                finally:
                    saved = self.saved_loras(name)
                    if saved:
                        self.files_saved(saved)  # the Lora cards see even the epochs of a failed run
            if grid and not result.stopped:
                self._render_grid(project, self.grid_plan(name), control, on_status)
            return result

        return self._start(f"train {name}", project, work, kind="train")

    # ---- grids ----

    def grid_plan(self, name: str, prompts: list[tuple[str, str]] | None = None, **options):
        """The epoch x weight plan for project `name`'s saved LoRAs (checked): `prompts` as (label, prompt)
        layers, by default the dataset's main and flexibility prompts; `options` as `grid_plan.make_plan`'s,
        the render settings defaulting to the host's."""
        from .grids.plan import default_prompts, make_plan

        project = self.project(name)
        if prompts is None:
            main, flexibility, _, _ = default_prompts(project)
            prompts = [("main", main), ("flexibility", flexibility)]
        if options.get("settings") is None and self.render_defaults is not None:
            options["settings"] = self.render_defaults()
        return make_plan(self.lora_dir(name), name, prompts, **options)

    def start_grid(self, name: str, plan=None) -> Job:
        """Render project `name`'s grid (`plan` from `grid_plan`, by default its default plan), scored
        with the default tagger when it can be loaded."""
        self._refuse_host_problem()
        project = self.project(name)
        plan = plan or self.grid_plan(name)
        return self._start(f"grid {name}", project, lambda control, on_status: self._render_grid(
            project, plan, control, on_status), kind="grid")

    def _refuse_host_problem(self) -> None:
        problem = self.host_problem()
        if problem:
            raise LoraMakerError(problem)

    def _start(self, title: str, project: Project, work, kind: str, gpu: bool = True) -> Job:
        """Start `work` as the one job, holding `project`'s claim while it runs (Busy when a job of
        another process holds it)."""
        holder = project.claimed_by()
        if holder:
            raise Busy(busy_message(holder, project.name))

        def claimed(control, on_status):
            with project.claim(title):
                return work(control, on_status)

        return self.jobs.start(title, project.name, claimed, kind=kind, gpu=gpu)

    def _render_grid(self, project: Project, plan, control, on_status):
        from .dataset.tagger import load_tagger
        from .errors import LoraMakerError
        from .grids.render import render_grid

        if self.open_renderer is None:
            raise LoraMakerError("this host cannot render images: grids need the WebUI or a checkpoint")
        progress = JobProgress(control, on_status)
        try:
            tagger = load_tagger(self.default_tagger(), cache_dir=self.model_cache(), progress=progress)
        except LoraMakerError as e:  # scored without likeness/flexibility, and said so
            tagger = None
            on_status(Status("scoring without the tagger", message=f"likeness is not scored: {e}"))
        with self.open_renderer() as renderer:
            return render_grid(project, plan, renderer, tagger=tagger, progress=progress)

    # ---- results ----

    def saved_loras(self, name: str) -> list[Path]:
        """Project `name`'s LoRA files in its Lora folder: the epoch and step saves NAME-*.safetensors in
        order, then NAME.safetensors (not another project's NAME2-... in a shared folder)."""
        from .project import validate_name

        folder = self.lora_dir(validate_name(name))
        if not folder.is_dir():
            return []
        found = folder.glob(f"{name}*.safetensors")  # a valid name has no glob characters
        return sorted(p for p in found if p.stem == name or p.stem.startswith(f"{name}-"))

    def can_resume(self, name: str) -> bool:
        """Whether project `name` has a stopped run to continue (`start_training(resume=True)`): its
        state is saved and no job works on it now."""
        from .training.state import has_state

        project = self.project(name)
        return has_state(project) and not self.jobs.busy() and project.claimed_by() is None

    def use_epoch(self, name: str, epoch: int, weight: float) -> list[Path]:
        """Epoch `epoch` of project `name` becomes NAME.safetensors, `weight` its card's preferred weight."""
        from .grids.render import use_epoch

        project = self.editable(name)
        written = use_epoch(project, self.lora_dir(name), epoch, weight)
        self.files_saved(written)
        return written
