"""The one `Studio` inside the WebUI: the tab and the API share it, and it outlives "Reload UI".

Reload UI runs `scripts/lora_maker.py` again as a new module, but this package stays in `sys.modules`,
so the singleton kept here (not in the script) survives: the reloaded tab and the new app's routes
find the same job runner and re-attach to the job that is still running.

GPU jobs run as a WebUI job would (webui-host.md §3.1, §3.4): under the GPU queue lock, so txt2img
waits instead of colliding, with their progress in `shared.state`, so the WebUI's own progress bar
(`/internal/progress`) and `/sdapi/v1/progress` show them, and its Interrupt button stops them (saving).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from ..hosts.host import gpu_memory
from ..jobs import RUNNING, Job, JobRunner
from ..paths import OPT_MODEL_CACHE, OPT_PROJECTS_ROOT, default_model_cache, default_projects_root
from ..studio import Studio
from .compat import host_problem

_studio: Studio | None = None
_studio_lock = threading.Lock()


def studio() -> Studio:
    """The WebUI's Studio, built on first use (after the WebUI's modules are up)."""
    global _studio
    with _studio_lock:
        if _studio is None:
            _studio = _build()
        return _studio


def _build() -> Studio:
    from modules import shared

    from .render import open_renderer, webui_render_defaults

    def configured(key: str, default):
        value = shared.opts.data.get(key)
        return Path(value).expanduser() if value else default()

    return Studio(
        projects_root=lambda: configured(OPT_PROJECTS_ROOT, default_projects_root),
        model_cache=lambda: configured(OPT_MODEL_CACHE, default_model_cache),
        open_host=_open_host,
        model_kind=_model_kind,
        lora_dir=lambda name: _lora_root() / name,
        jobs=JobRunner(guard=_as_webui_job, observe=_mirror_to_state),
        files_saved=_refresh_loras,
        gpu_memory=_gpu_memory,
        option=lambda key: shared.opts.data.get(key),
        open_renderer=open_renderer,
        render_defaults=webui_render_defaults,
        paste_to_txt2img=_paste_to_txt2img,
        host_problem=host_problem,
        model_notes=_model_notes,
    )


def _paste_to_txt2img(button, textbox) -> None:
    """Make `button` send the infotext in `textbox` to txt2img, as PNG Info's button does. Registered
    while the tab is built: the WebUI wires the bindings after `on_ui_tabs` (and clears them on Reload UI)."""
    from modules import infotext_utils

    infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
        paste_button=button, tabname="txt2img", source_text_component=textbox))


# ---- the model and the Lora folder ----


@contextlib.contextmanager
def _open_host(settings=None) -> Iterator:  # the WebUI's model is as the WebUI loaded it
    from .host import WebuiHost, training_session

    host = WebuiHost()  # loads the selected checkpoint if none is loaded yet (we hold the queue lock)
    with training_session(host):
        yield host


def _model_notes() -> list[str]:
    """A v-prediction checkpoint (NoobAI V-Pred's `v_pred` key) that the WebUI samples as eps, having no yaml."""
    from modules import sd_models

    from .host import v_sampled_as_eps

    model = sd_models.model_data.sd_model
    if model is None or not v_sampled_as_eps(model):
        return []
    path = Path(model.sd_checkpoint_info.filename)
    return [f"{path.name} is a v-prediction model (its v_pred key says so, as NoobAI V-Pred's does), but the WebUI "
            f"samples it as eps (it reads v-prediction from a yaml only): LoRA Maker trains it as v, and its pictures "
            f"(test grids, txt2img) look wrong until a yaml whose denoiser uses sgm's VScaling is saved beside it as "
            f"{path.stem}.yaml and the model is reloaded"]


def _model_kind() -> str | None:
    """The loaded model's kind; None when none is loaded. Reads `model_data` directly: `shared.sd_model`
    would start loading one."""
    from modules import sd_models

    from .host import model_kind

    model = sd_models.model_data.sd_model
    if model is None or getattr(model, "is_sd3", False):
        return None
    return model_kind(model)


def _lora_root() -> Path:
    from modules import paths, shared

    # --lora-dir comes from the built-in Lora extension's preload; without that extension, its default.
    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))


def _refresh_loras(files: list[Path]) -> None:
    """Rescan the Lora folder, so /sdapi/v1/loras lists the new files and the cards show them on refresh,
    and forget the merged weights and cached conditionings of files rewritten under the same names (a
    new run's final file, "use this epoch"), so the next txt2img uses the new file."""
    from .render import refresh_loras

    refresh_loras()


def _gpu_memory() -> tuple[float, float] | None:
    from modules import devices

    return gpu_memory(devices.device)  # None with --use-cpu: the card, if any, is not what trains


# ---- GPU jobs as WebUI jobs ----

# The job that holds the queue lock now: only it may write `shared.state` (a download runs beside
# txt2img and must leave txt2img's progress alone).
_holder: Job | None = None


@contextlib.contextmanager
def _as_webui_job(job: Job) -> Iterator[None]:
    """What `call_queue.wrap_gradio_gpu_call` does around a click, for a background thread. Unlike it,
    `state.end()` also runs when the job fails, so the WebUI never shows a dead job as running. The
    queue lock is not re-entrant: nothing inside may take it (e.g. `opts.set` of the model)."""
    global _holder
    from modules import call_queue, progress, shared

    progress.add_task_to_queue(job.task_id)  # the progress bar says "In queue" while txt2img finishes
    with call_queue.queue_lock:
        shared.state.begin(job=job.task_id)
        shared.state.textinfo = f"LoRA Maker: {job.title}"
        progress.start_task(job.task_id)
        _holder = job
        try:
            yield
        finally:
            _holder = None
            # No progress.record_results: it keeps gradio outputs for a reloaded txt2img page; a job
            # has none, and the tab re-attaches through the job runner instead.
            progress.finish_task(job.task_id)
            shared.state.end()
            # What wrap_gradio_call resets after a job, so an Interrupt meant for us stops nothing else.
            shared.state.interrupted = shared.state.skipped = shared.state.stopping_generation = False


def _mirror_to_state(job: Job) -> None:
    """Show the job's status in `shared.state` (the WebUI's progress bar and /sdapi/v1/progress read
    it), and turn the WebUI's Interrupt (its button, /sdapi/v1/interrupt, Reload UI) into stop-and-save."""
    from modules import shared

    if job is not _holder:
        return
    state, status = shared.state, job.status
    if status is not None:
        state.job_count, state.job_no = status.total_steps or 0, status.step or 0
        state.sampling_step = state.sampling_steps = 0
        state.textinfo = _status_line(job)
        done = status.step / status.total_steps if status.total_steps else 0
        if status.eta_s is not None and 0 < done < 1:
            # The WebUI's ETA is elapsed * (1 - done) / done since time_start, which spans every phase
            # (loading, caching, saving): dated back so that it shows the job's own ETA instead.
            state.time_start = time.time() - status.eta_s * done / (1 - done)
    if state.interrupted and job.state == RUNNING and not job.control.stop_requested:
        job.control.stop(save=True)


def _status_line(job: Job) -> str:
    """One line (the progress bar shows textinfo only when it has no line break)."""
    status = job.status
    parts = [f"LoRA Maker: {job.title}", status.phase]
    if status.total_steps:
        parts.append(f"{status.step}/{status.total_steps}")
    if status.epochs:
        parts.append(f"epoch {status.epoch}/{status.epochs}")
    if status.loss is not None:
        parts.append(f"loss {status.loss:.4f}")
    if job.control.stop_requested:
        parts.append("stopping")
    return " · ".join(parts).replace("\n", " ")
