"""The training loop: a project's dataset, a host's model, settings in; LoRA files out.

    result = train(project, host, settings, lora_dir)

Everything that can be checked is checked before the model is touched (dataset, settings, steps).
The host's model is then prepared (model_mode.py), latents are cached once per image and
orientation, and the loop runs with the network attached; whatever happens, the network is detached
and the model restored. Epoch files are `NAME-000001.safetensors` ..., the last `NAME.safetensors`;
the resumable state (network, optimizer, scheduler, step, RNG) lives in the project's train/ folder.
"""

from __future__ import annotations

import contextlib
import csv
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import LoraMakerError
from ..hosts.host import SDXL, Host, gpu_memory
from ..progress import Control, Progress, Status
from ..project import Project
from . import objective
from .data import TrainData
from .latents import cache_latents, cached
from .model_mode import clip_skip_set, off_the_gpu, prepared_for_training
from .network import Network, NetworkConfig
from .optimizers import autocast_for, check_args, make_optimizer, parse_args
from .run_files import RunFiles
from .schedules import make_scheduler
from .settings import TrainSettings
from .state import state_dir, state_path
from .text_cache import batch_conditioning, cache_conditioning


@dataclass
class Result:
    files: list[Path] = field(default_factory=list)  # every LoRA written, in order
    final: Path | None = None  # NAME.safetensors when training ran to the end
    steps: int = 0
    stopped: bool = False
    loss_log: Path | None = None


class _Trainer(RunFiles):
    def __init__(self, project: Project, host: Host, settings: TrainSettings, lora_dir: Path, name: str,
                 control: Control, on_status: Callable[[Status], None], progress: Progress):
        self.project, self.host, self.lora_dir, self.name = project, host, Path(lora_dir), name
        self.control, self.on_status, self.progress = control, on_status, progress
        settings = settings.resolved(host.kind, project)
        settings.validate(host.kind)
        self.settings = settings
        self.optimizer_args = parse_args(settings.optimizer_args)
        check_args(settings.optimizer, self.optimizer_args)  # a typo fails now, not after caching
        self.data = TrainData.from_project(project, settings, host.kind, progress)  # checks the dataset
        self.plan = self.data.step_plan()
        self.total_steps = self.plan.total_steps
        self.epochs = -(-self.total_steps // self.plan.steps_per_epoch)
        self.train_te = settings.text_encoder_lr > 0 and bool(host.text_encoders)
        if settings.unet_lr <= 0 and not self.train_te:
            raise LoraMakerError("nothing would be trained: unet_lr is 0 and this model's text encoder is not trained")
        if host.device.type == "cuda" and settings.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise LoraMakerError("this GPU has no bf16: set mixed_precision=fp16")
        # NoobAI V-Pred and its kind were trained to reach pure noise: auto means on for SDXL v-prediction.
        self.parameterization = settings.prediction or host.parameterization
        v_prediction = self.parameterization == "v"
        auto = host.kind == SDXL and v_prediction
        self.zero_terminal_snr = auto if settings.zero_terminal_snr is None else settings.zero_terminal_snr
        self.scale_v_pred_loss = auto if settings.scale_v_pred_loss is None else settings.scale_v_pred_loss
        if (self.zero_terminal_snr or self.scale_v_pred_loss) and not v_prediction:
            raise LoraMakerError("zero_terminal_snr and scale_v_pred_loss are for v-prediction models; this one "
                                 "predicts noise (eps): set them to auto or off")
        if settings.mixed_precision == "no" and host.dtype != torch.float32:
            raise LoraMakerError("mixed_precision=no needs the model in full precision (the WebUI's --no-half): "
                                 "use fp16 or bf16")
        self.result = Result()
        self.started_at = time.time()
        self.epoch_files: list[str] = []  # this run's epoch files, oldest first (keep_last_n_epochs prunes them)

    # ---- the loop ----

    def _gpu_memory(self) -> str:
        memory = gpu_memory(self.host.device)
        return f"GPU memory: {memory[0]:.1f} GB free of {memory[1]:.1f} GB" if memory else ""

    def _out_of_memory(self) -> str:
        s = self.settings
        facts = [self._gpu_memory()]
        if self.host.device.type == "cuda":
            facts.insert(0, f"peak {torch.cuda.max_memory_allocated(self.host.device) / 2**30:.1f} GB")
        advice = [f"batch_size={max(1, s.batch_size // 2)}"]
        if not s.gradient_checkpointing:
            advice.append("gradient_checkpointing=true")
        if s.resolution > 512:
            advice.append(f"resolution={s.resolution - 256}")
        if s.optimizer == "AdamW":
            advice.append("optimizer=AdamW8bit")
        known = "; ".join(filter(None, facts))
        return (f"out of GPU memory{f' ({known})' if known else ''}: try " + ", ".join(advice)
                + ", or close other programs using the GPU")

    def status(self, phase: str, **values) -> None:
        if self.host.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.host.device) / 2**30
        self.on_status(Status(phase, total_steps=self.total_steps, epochs=self.epochs, **values))

    def run(self, resume: bool) -> Result:
        # The host's random number generators are its own (the WebUI's next seed -1 must stay random):
        # the run draws from local ones, and torch's global ones are given back as they were.
        cuda = [self.host.device] if self.host.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            return self._run(resume)

    def _run(self, resume: bool) -> Result:
        s = self.settings
        self.session_id = random.SystemRandom().randint(0, 2**31)
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(s.seed)  # the network's initial weights (lycoris draws from the global generator)
        self.status("plan", message="\n".join(filter(None, [self.plan.render(), *self.plan.warnings, self._gpu_memory()])))
        host = self.host
        with prepared_for_training(host, bool(s.gradient_checkpointing)), clip_skip_set(host, s.clip_skip):
            self._cache()
            config = NetworkConfig(s.network, s.dim, s.alpha, s.conv_dim, s.conv_alpha)
            self.network = Network(host, config, train_text_encoder=self.train_te)
            if s.network_weights and not resume:  # a resumed run's state holds the weights it reached
                self.start_from(Path(s.network_weights).expanduser())
            try:
                self.network.attach()
                # what training does not use leaves the GPU: the VAE, the text encoders whose outputs are cached
                with off_the_gpu([getattr(host, "vae", None), *(host.text_encoders if self.text_cache else [])]):
                    return self._freeing_on_oom(self._loop, resume)
            except KeyboardInterrupt:  # Ctrl-C or the WebUI's interrupt: keep what was learned
                if getattr(self, "position", None):
                    self.save_state(*self.position)
                raise
            finally:
                self.network.detach()

    def _cache(self) -> None:
        """The latents, then (when asked) the text encoders' outputs, each cached with only its encoder on
        the GPU: one big part there at a time, as the WebUI's --medvram does, so small cards cache too."""
        s, host = self.settings, self.host
        self.status("caching latents")
        folders = {}
        for what, where in (("latents", s.cache_latents), ("text", s.cache_text_encoder_outputs)):
            if where == "disk":
                folders[what] = state_dir(self.project) / what
                folders[what].mkdir(parents=True, exist_ok=True)
        with off_the_gpu([host.unet, *host.text_encoders]):
            self.cache = self._freeing_on_oom(cache_latents, host, self.data, self.progress, folders.get("latents"))
        self.text_cache = None
        if s.cache_text_encoder_outputs != "no":
            with off_the_gpu([host.unet, getattr(host, "vae", None)]):
                self.text_cache = self._freeing_on_oom(cache_conditioning, host, self.data, self.progress,
                                                       folders.get("text"))

    def _freeing_on_oom(self, work, *args):
        """`work(*args)`; out of GPU memory, the failed step's tensors are freed before anything of the
        host is put back (moving the VAE back to the GPU needs that memory), then the error says what to
        change. The tensors live in the frames the exception's traceback holds, so the freeing must
        happen after the except block, where that exception is gone."""
        try:
            return work(*args)
        except torch.cuda.OutOfMemoryError:
            message = self._out_of_memory()
        self._free_memory()
        raise LoraMakerError(message)

    def _free_memory(self) -> None:
        import gc

        for name in ("optimizer", "scheduler", "scaler", "cache", "text_cache"):  # the run is over: its state can go
            setattr(self, name, None)
        for p in getattr(self, "params", ()):
            p.grad = None
        gc.collect()
        if self.host.device.type == "cuda":
            torch.cuda.empty_cache()

    def _loop(self, resume: bool) -> Result:
        s = self.settings
        self.optimizer = make_optimizer(s.optimizer, self.network.parameter_groups(s.unet_lr, s.text_encoder_lr),
                                        self.optimizer_args)
        self.scheduler = make_scheduler(self.optimizer, s.lr_scheduler, self.total_steps, self.plan.warmup_steps,
                                        s.lr_cycles, s.lr_power)
        self.autocast, self.scaler = autocast_for(self.host, s.mixed_precision)
        self.generator = torch.Generator().manual_seed(s.seed)
        self.losses: list[float] = []
        self.position = None
        step, start_epoch, skip = self._restore() if resume else (0, 0, 0)
        schedule = self.host.alphas_cumprod
        self.alphas = (objective.zero_terminal_snr(schedule) if self.zero_terminal_snr else schedule).to(self.host.device)
        self.params = list(self.network.parameters())
        self.network.train()
        self.started, self.first_step = time.monotonic(), step
        with self._loss_log() as log:
            for epoch in range(start_epoch, self.epochs):
                for index, batches in enumerate(self.data.epoch_steps(epoch)):
                    if index < skip:
                        continue
                    if step >= self.total_steps:
                        break
                    loss, lr = self._step(batches, step)
                    step += 1
                    self.position = (step, epoch, index + 1)  # where a resume continues
                    self._report(log, step, epoch, loss, lr)
                    if self._steered(step, epoch, index):
                        return self.result
                skip = 0
                last = epoch + 1 == self.epochs or step >= self.total_steps
                every = s.save_every_n_epochs
                if not last and every and (epoch + 1) % every == 0:
                    self.status("saving", step=step, epoch=epoch + 1)
                    self.save_epoch(epoch + 1, step)
                self.save_state(step, epoch + 1, 0)
                if last:
                    break
        self.status("saving", step=step, epoch=self.epochs)
        self.result.final = self.save_lora(self.lora_dir / f"{self.name}.safetensors", self.epochs, step)
        self.result.steps = step
        state_path(self.project).unlink(missing_ok=True)  # finished: nothing left to resume
        self.status("done", step=step, epoch=self.epochs)
        return self.result

    def _restore(self) -> tuple[int, int, int]:
        """Load the stopped run's state; returns (step, epoch, batch) to continue from."""
        state = self.load_state()
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch_files = list(state.get("epoch_files", []))
        self.session_id, self.started_at, self.losses = state["session_id"], state["started_at"], state["losses"]
        return state["step"], state["epoch"], state["batch"]

    @contextlib.contextmanager
    def _loss_log(self):
        """The run's loss CSV (one per run, appended to on resume)."""
        started = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at))
        path = self.result.loss_log = state_dir(self.project) / "runs" / f"{started}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            log = csv.writer(f)
            if new:
                log.writerow(["step", "epoch", "loss", "lr", "seconds"])
            yield log

    def _step(self, batches, step: int) -> tuple[float, float]:
        """One optimizer step on `batches` (their gradients accumulated, each weighed by its share of the
        images, so that it trains as one batch of them all); returns (loss, the learning rate it used)."""
        s, scaler = self.settings, self.scaler
        self.optimizer.zero_grad(set_to_none=True)
        images, total = sum(len(plan.samples) for plan in batches), 0.0
        for plan in batches:
            loss = self._loss(plan, step) * (len(plan.samples) / images)
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler:
            scaler.unscale_(self.optimizer)
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return total, lr

    def _loss(self, plan, step: int) -> torch.Tensor:
        """The loss of the batch `plan` (checked: finite, its conditioning too on the first step)."""
        s, host = self.settings, self.host
        latents = torch.stack([cached(self.cache, key) for key in plan.keys]).to(host.device)
        noise, timesteps, put_in = objective.sample(
            latents, self.generator, len(host.alphas_cumprod), s.noise_offset, s.multires_noise_iterations,
            s.multires_noise_discount, s.ip_noise_gamma)
        noisy = objective.add_noise(latents, put_in, timesteps, self.alphas)
        with self.autocast:
            if self.text_cache is not None:
                cond = batch_conditioning(self.text_cache, plan.keys, host.device)
            else:
                sizes = self.data.sizes(plan) if host.kind == SDXL else None
                with torch.set_grad_enabled(self.train_te):
                    cond = host.conditioning(plan.captions, sizes)
            if step == self.first_step:
                _check_conditioning(cond, plan.captions)
            prediction = host.apply_model(noisy.to(host.dtype), timesteps, cond)
        wanted = objective.target(latents, noise, timesteps, self.alphas, self.parameterization)
        weights = (objective.snr_weights(timesteps, self.alphas, s.min_snr_gamma, self.parameterization)
                   if s.min_snr_gamma else None)
        if self.scale_v_pred_loss:
            scale = objective.v_pred_like_eps_weights(timesteps, self.alphas)
            weights = scale if weights is None else weights * scale
        loss = objective.loss(prediction, wanted, weights)
        if not torch.isfinite(loss):
            if self.position:
                self.save_state(*self.position)  # what was learned up to here, resumable
            raise LoraMakerError(f"the loss became {loss.item()} at step {step + 1}: lower the learning rate, or use "
                                 "bf16 or no mixed precision")
        return loss

    def _report(self, log, step: int, epoch: int, loss: float, lr: float) -> None:
        self.losses.append(loss)
        elapsed = time.monotonic() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else None
        log.writerow([step, epoch + 1, f"{loss:.6f}", f"{lr:.3e}", f"{elapsed:.2f}"])
        recent = self.losses[-20:]
        self.status("training", step=step, epoch=epoch + 1, loss=sum(recent) / len(recent), lr=lr,
                    it_per_s=rate, eta_s=(self.total_steps - step) / rate if rate else None)

    def _steered(self, step: int, epoch: int, batch_index: int) -> bool:
        """Serve the user's save-now and stop requests after a step; True when the run stops here."""
        if self.control.take_save_request():
            self.save_lora(self.lora_dir / f"{self.name}-step{step:08d}.safetensors", epoch + 1, step)
            self.save_state(step, epoch, batch_index + 1)
        if not (self.control.stop_requested or self.progress.should_stop()):
            return False
        self.result.stopped = True
        if self.control.save_on_stop:
            self.status("saving", step=step, epoch=epoch + 1)
            self.save_lora(self.lora_dir / f"{self.name}-step{step:08d}.safetensors", epoch + 1, step)
        self.save_state(step, epoch, batch_index + 1)
        self.result.steps = step
        return True


def _check_conditioning(cond, captions: list[str]) -> None:
    """The first batch's conditioning is finite, or the run stops before it learns from NaN."""
    tensors = cond.values() if isinstance(cond, dict) else [cond]
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return
    raise LoraMakerError(
        f"the text encoder gave NaN or infinite conditioning for the first batch ({'; '.join(captions)}): it "
        "overflows in half precision, or the checkpoint's text encoder is broken. Try mixed_precision=bf16 (or "
        "the WebUI's --no-half), or another checkpoint")


def train(project: Project, host: Host, settings: TrainSettings, lora_dir: Path, *, name: str | None = None,
          resume: bool = False, control: Control | None = None, on_status: Callable[[Status], None] | None = None,
          progress: Progress | None = None) -> Result:
    """Train a LoRA on `host` from `project`'s dataset into `lora_dir` (`name` defaults to the
    project's). Raises LoraMakerError before touching the model when the dataset or settings can't
    work; on stop, the state is saved and `resume=True` continues the same run."""
    trainer = _Trainer(project, host, settings, lora_dir, name or project.name, control or Control(),
                       on_status or (lambda status: None), progress or Progress())
    return trainer.run(resume)
