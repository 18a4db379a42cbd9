"""LoRA Maker as a running service: the projects, the one background job, and the model it trains on.

The tab (`tab/`) and the HTTP API (`api.py`) are two faces of one `Studio`, so a click and a request
do exactly the same thing. The WebUI adapter (`webui/studio.py`) and the standalone app (`app.py`) each
build one from what their host provides: the model, the GPU lock, the Lora folder and the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from .hosts.host import Host
from .jobs import Job, JobProgress, JobRunner
from .paths import OPT_DEFAULT_PRESET, OPT_DEFAULT_TAGGER, OPT_TAG_CHARACTER_THRESHOLD, OPT_TAG_THRESHOLD
from .progress import Status
from .project import Project, list_projects
from .training import settings as train_settings
from .training.settings import TrainSettings


def _cuda_memory() -> tuple[float, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return free / 2**30, total / 2**30


@dataclass
class Studio:
    projects_root: Callable[[], Path]
    model_cache: Callable[[], Path | None]
    # The model to train on, ready for training, put back exactly as it was on exit.
    open_host: Callable[[], ContextManager[Host]]
    # SD1/SD2/SDXL of the model training would use, or None when none is loaded (cheap: no loading).
    model_kind: Callable[[], str | None]
    lora_dir: Callable[[str], Path]  # where a project's LoRA files go
    jobs: JobRunner = field(default_factory=JobRunner)
    files_saved: Callable[[list[Path]], None] = lambda files: None  # e.g. refresh the WebUI's Lora list
    gpu_memory: Callable[[], tuple[float, float] | None] = _cuda_memory  # free, total GiB
    option: Callable[[str], Any] = lambda key: None  # a setting of the host (the WebUI's Settings page)
    # What renders grid cells (the WebUI's txt2img, or the standalone sampler), inside the GPU job.
    open_renderer: Callable[[], ContextManager] | None = None
    # The render settings grids start from (the WebUI's txt2img defaults there).
    render_defaults: Callable[[], Any] | None = None
    # Binds a "Send to txt2img" button to a textbox holding an infotext (the WebUI's paste buttons).
    paste_to_txt2img: Callable[[Any, Any], None] | None = None
    last_project: str | None = None  # the project picked last, shown again when the page is reloaded

    # ---- projects ----

    def projects(self) -> list[str]:
        return list_projects(self.projects_root())

    def project(self, name: str, create: bool = False) -> Project:
        """The project `name` (validated: names never reach outside the projects root)."""
        return Project.open(self.projects_root(), name, create=create)

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

        return self.jobs.start(f"scrape {name}", name, work, kind="scrape", gpu=False)

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

        return self.jobs.start(f"tag {name}", name, work, kind="tag")

    def start_captioning(self, name: str, model: str | None = None, existing: str = "skip") -> Job:
        """Caption project `name` in sentences with BLIP (for photos)."""
        from .dataset.captioner import caption_project, load_blip

        project = self.project(name)

        def work(control, on_status):
            progress = JobProgress(control, on_status)
            captioner = load_blip(model, cache_dir=self.model_cache(), progress=progress)
            return caption_project(project, captioner, existing=existing, progress=progress)

        return self.jobs.start(f"caption {name}", name, work, kind="caption")

    def start_training(self, name: str, settings: TrainSettings | None = None, resume: bool = False,
                       grid: bool = False) -> Job:
        """Train project `name` (its saved settings unless `settings` are given) on the host's model;
        with `grid`, render the default epoch x weight grid in the same job when training ends."""
        from .training.trainer import train

        project = self.project(name)
        settings = settings if settings is not None else train_settings.load(project)
        lora_dir = self.lora_dir(name)

        def work(control, on_status):
            with self.open_host() as host:
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

        return self.jobs.start(f"train {name}", name, work, kind="train")

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
        project = self.project(name)
        plan = plan or self.grid_plan(name)
        return self.jobs.start(f"grid {name}", name, lambda control, on_status: self._render_grid(
            project, plan, control, on_status), kind="grid")

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
        """Whether project `name` has a stopped run to continue (`start_training(resume=True)`)."""
        from .training.trainer import STATE_FILE, state_dir

        return (state_dir(self.project(name)) / STATE_FILE).is_file()
