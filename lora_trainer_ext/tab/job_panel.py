"""The job panel: the running (or last) job's progress, its controls, and the loss chart.

The page clicks the hidden poll button every second (javascript/lora_maker.js) with `queue=False`, a
plain HTTP request: unlike a websocket stream it survives proxies and sleeping laptops, and a reloaded
page simply polls again and re-attaches to the job.
"""

from __future__ import annotations

import html
import math

from ..studio import Studio

_CHART_W, _CHART_H, _LEFT, _PAD = 600, 160, 60, 16
_MAX_POINTS = 400


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def loss_chart(losses: list[tuple[int, float]]) -> str:
    """An inline SVG line chart of (step, loss), thinned to a few hundred points, with its axis ranges."""
    points = [(s, l) for s, l in losses if l is not None and math.isfinite(l)]
    if len(points) < 2:
        return ""
    stride = math.ceil(len(points) / _MAX_POINTS)
    points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    (x0, x1), (y0, y1) = (points[0][0], points[-1][0]), (min(l for _, l in points), max(l for _, l in points))
    span_x, span_y = max(x1 - x0, 1), max(y1 - y0, 1e-12)
    w, h = _CHART_W - _LEFT - _PAD, _CHART_H - 2 * _PAD - 16  # room for the loss labels left, steps below
    coords = " ".join(f"{_LEFT + (s - x0) / span_x * w:.1f},{_PAD + (1 - (l - y0) / span_y) * h:.1f}" for s, l in points)
    label = 'class="label" text-anchor'
    return (
        f'<svg class="lora-maker-loss-chart" viewBox="0 0 {_CHART_W} {_CHART_H}" role="img" aria-label="loss by step">'
        f'<text x="{_LEFT - 6}" y="{_PAD + 4}" {label}="end">{y1:.4f}</text>'
        f'<text x="{_LEFT - 6}" y="{_PAD + h}" {label}="end">{y0:.4f}</text>'
        f'<text x="{_LEFT}" y="{_PAD + h + 16}" {label}="start">step {x0}</text>'
        f'<text x="{_LEFT + w}" y="{_PAD + h + 16}" {label}="end">step {x1}</text>'
        f'<rect x="{_LEFT}" y="{_PAD}" width="{w}" height="{h}" class="frame"/>'
        f'<polyline points="{coords}" class="line"/></svg>'
    )


def render(snapshot: dict | None) -> str:
    """The panel's HTML for a job snapshot (jobs.Job.snapshot), or an idle note."""
    if snapshot is None:
        return '<div id="lora_maker_job_status" data-state="idle" class="lora-maker-note">No job has run yet.</div>'
    e = html.escape
    status = snapshot.get("status") or {}
    state = snapshot["state"]
    total, step = status.get("total_steps") or 0, status.get("step") or 0
    percent = 100 * step / total if total else 0
    facts = [status.get("phase", "starting") if state == "running" else state]
    if total:
        facts.append(f"{step}/{total}")
    if status.get("epochs"):
        facts.append(f"epoch {status.get('epoch')}/{status['epochs']}")
    if status.get("loss") is not None:
        facts.append(f"loss {status['loss']:.4f}")
    if status.get("lr") is not None:
        facts.append(f"lr {status['lr']:.2e}")
    if status.get("it_per_s"):
        facts.append(f"{status['it_per_s']:.2f} it/s")
    if state == "running" and status.get("eta_s") is not None:
        facts.append(f"ETA {_duration(status['eta_s'])}")
    if status.get("peak_memory_gb"):
        facts.append(f"peak VRAM {status['peak_memory_gb']:.1f} GB")
    parts = [
        f'<div id="lora_maker_job_status" data-state="{e(state)}" data-kind="{e(snapshot.get("kind", ""))}" '
        f'data-task-id="{e(snapshot.get("task_id", ""))}" data-job="{snapshot["id"]}">',
        f'<div class="lora-maker-job-head"><b>{e(snapshot["title"])}</b> <span class="lora-maker-badge '
        f'lora-maker-{e(state)}">{e(state)}</span></div>',
        f'<div class="lora-maker-bar"><div style="width:{percent:.1f}%"></div></div>',
        f'<div class="lora-maker-job-facts">{e(" · ".join(facts))}</div>',
    ]
    if status.get("message"):
        parts.append(f'<div class="lora-maker-note">{e(status["message"])}</div>')
    if snapshot.get("summary"):
        parts.append(f'<div class="lora-maker-job-summary">{e(snapshot["summary"])}</div>')
    if snapshot.get("error"):
        parts.append(f'<div class="lora-maker-error">{e(snapshot["error"])}</div>')
    if snapshot.get("files"):
        names = [f.replace("\\", "/").rsplit("/", 1)[-1] for f in snapshot["files"]]
        parts.append(f'<div class="lora-maker-note">saved: {e(", ".join(names[-5:]))}</div>')
    parts.append(loss_chart(snapshot.get("losses") or []))
    parts.append("</div>")
    return "".join(parts)


def build(studio: Studio, blocks):
    """The panel and its buttons; returns the hidden job-event box sub-tabs refresh on."""
    import gradio as gr

    def snapshot():
        job = studio.jobs.current()
        return job.snapshot() if job else None

    def poll():
        snap = snapshot()
        running = bool(snap) and snap["state"] == "running"
        training = running and snap["kind"] == "train"
        event = f"{snap['id']}:{snap['state']}" if snap else ""
        return (render(snap), event, gr.Button.update(visible=running), gr.Button.update(visible=training),
                gr.Button.update(visible=training))

    # progress-container: where the WebUI's own progress bar (javascript/progressbar.js) places itself
    with gr.Group(elem_id="lora_maker_job", elem_classes="progress-container"):
        gr.HTML(elem_id="lora_maker_progress")  # inside the WebUI: its own progress bar for GPU jobs
        panel = gr.HTML(render(snapshot()), elem_id="lora_maker_job_panel")
        with gr.Row():
            stop = gr.Button("Stop", elem_id="lora_maker_job_stop", visible=False)
            stop_save = gr.Button("Stop and save", elem_id="lora_maker_job_stop_save", visible=False)
            save_now = gr.Button("Save now", elem_id="lora_maker_job_save_now", visible=False)
    poll_button = gr.Button(visible=False, elem_id="lora_maker_job_poll")
    job_event = gr.Textbox(visible=False, elem_id="lora_maker_job_event")

    outputs = [panel, job_event, stop, stop_save, save_now]
    poll_button.click(poll, None, outputs, queue=False)
    blocks.load(poll, None, outputs, queue=False)
    stop.click(lambda: studio.jobs.stop(save=False), None, None, queue=False).then(poll, None, outputs, queue=False)
    stop_save.click(lambda: studio.jobs.stop(save=True), None, None, queue=False).then(poll, None, outputs, queue=False)
    save_now.click(studio.jobs.save_now, None, None, queue=False).then(poll, None, outputs, queue=False)
    return job_event
