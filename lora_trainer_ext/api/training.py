"""API routes of training: the project's settings, the plan (the same count the tab and the trainer
show), and starting a run."""

from __future__ import annotations

from fastapi import APIRouter

from ..errors import LoraMakerError
from ..studio import Studio
from .bodies import TrainRequest
from .projects import existing


def plan_answer(plan) -> dict:
    """A `training.plan.TrainingPlan` as JSON (400 when the dataset makes no steps)."""
    steps, fix = plan.steps, plan.memory_fix
    if steps is None:
        raise LoraMakerError(plan.problem)
    return {"line": steps.render(), "images": steps.images, "steps_per_epoch": steps.steps_per_epoch,
            "epochs": steps.epochs, "total_steps": steps.total_steps, "warmup_steps": steps.warmup_steps,
            "buckets": plan.buckets, "warnings": plan.warnings, "family_defaults": plan.family_defaults,
            "optimizer": plan.optimizer,
            "vram": {"model": plan.kind, "estimate_gib": round(plan.estimate.total_gib, 2),
                     "summary": plan.estimate.summary(), "verdict": plan.verdict, "notes": plan.memory_notes,
                     "fit": {"changes": fix[1], "settings": fix[0].to_dict()} if fix else None}}


def add(router: APIRouter, studio: Studio) -> None:
    @router.get("/projects/{name}/train/settings")
    def get_settings(name: str):
        return studio.training_settings(existing(studio, name).name).to_dict()

    @router.put("/projects/{name}/train/settings")
    def put_settings(name: str, body: dict):
        project = existing(studio, name)
        # What the body leaves out is the loaded model family's default (SDXL's differ from SD1's).
        return studio.save_training_settings(project.name, studio.default_training_settings().replace(**body)).to_dict()

    @router.get("/projects/{name}/train/plan")
    def plan(name: str):
        return plan_answer(studio.training_plan(existing(studio, name).name))

    @router.post("/projects/{name}/train", status_code=202)
    def train(name: str, body: TrainRequest | None = None):
        body = body or TrainRequest()
        project = existing(studio, name)
        settings = studio.training_settings(project.name)
        if body.settings:
            settings = settings.replace(**body.settings)
        return studio.start_training(project.name, settings, resume=body.resume, restart=body.restart).snapshot()
