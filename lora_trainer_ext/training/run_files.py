"""What a training run writes: its LoRA files (kohya's names and `ss_*` metadata, a Lora card beside
each, the last N epochs kept), and its resumable state, checked against the run that would continue it.

`RunFiles` is the trainer's side of this (trainer.py's `_Trainer` is one): it reads the run's settings,
host, network, optimizer and position from the trainer it is part of.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..dataset.curate import activation_tags
from ..errors import LoraMakerError
from . import lora_file
from .data import dataset_dirs, metadata_tag_frequency
from .optimizers import describe, precision_used
from .state import changed_settings, read_state, write_state

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class RunFiles:
    def start_from(self, path: Path) -> None:
        """The network's weights from an existing LoRA file (the XL trainer's "Continue"): one of this model
        kind, network type, rank and text-encoder choice, or an error that says which differs."""
        if not path.is_file():
            raise LoraMakerError(f"network_weights: there is no LoRA file at {path}")
        tensors, meta = lora_file.read_lora(path)
        trained_on = meta.get("ss_base_model_version", "")
        if trained_on and trained_on.startswith("sdxl") != (self.host.kind == "sdxl"):
            raise LoraMakerError(f"{path.name} was trained on another model family ({trained_on}): it cannot "
                                 f"continue on this {self.host.kind} model")
        try:
            named = lora_file.from_output_names({k: v.float() for k, v in tensors.items()}, self.host.kind,
                                                self.network.module_paths())
            self.network.load_lora_state_dict(named)
        except (LoraMakerError, RuntimeError) as e:
            raise LoraMakerError(f"{path.name} does not fit this network: train with the network type, dim, conv_dim "
                                 f"and text-encoder choice it was made with ({e})") from None

    def _run_facts(self, epoch: int, step: int) -> dict:
        s = self.settings
        return {
            "output_name": self.name, "session_id": self.session_id, "training_started_at": self.started_at,
            "training_finished_at": time.time(), "sd_model_name": self.host.model_name,
            "sd_model_hash": self.host.model_legacy_hash or None, "new_sd_model_hash": self.host.model_sha256 or None,
            "seed": s.seed, "num_epochs": self.epochs, "epoch": epoch,
            "steps": step, "max_train_steps": self.total_steps, "num_batches_per_epoch": self.plan.steps_per_epoch,
            "num_train_images": len(self.data.items) * s.repeats, "batch_size_per_device": s.batch_size,
            "total_batch_size": s.batch_size * s.gradient_accumulation_steps,
            "gradient_accumulation_steps": s.gradient_accumulation_steps, "learning_rate": s.unet_lr, "unet_lr": s.unet_lr,
            "text_encoder_lr": s.text_encoder_lr if self.train_te else 0.0, "optimizer": describe(s.optimizer, self.optimizer_args),
            "lr_scheduler": s.lr_scheduler, "lr_warmup_steps": self.plan.warmup_steps, "max_grad_norm": s.max_grad_norm,
            "mixed_precision": precision_used(self.host, s.mixed_precision), "gradient_checkpointing": s.gradient_checkpointing,
            "cache_latents": True, "clip_skip": getattr(self.host, "clip_skip", None) if self.host.kind != "sdxl" else None, "min_snr_gamma": s.min_snr_gamma or None,
            "noise_offset": s.noise_offset or None, "multires_noise_iterations": s.multires_noise_iterations or None,
            "multires_noise_discount": s.multires_noise_discount if s.multires_noise_iterations else None,
            "ip_noise_gamma": s.ip_noise_gamma or None, "zero_terminal_snr": self.zero_terminal_snr,
            "scale_v_pred_loss_like_noise_pred": self.scale_v_pred_loss,
            "keep_tokens": s.keep_tokens, "flip_aug": s.flip_aug,
            "shuffle_caption": s.shuffle_tags, "caption_dropout_rate": s.caption_dropout,
            "caption_tag_dropout_rate": s.tag_dropout, "enable_bucket": s.buckets, "min_bucket_reso": s.min_bucket,
            "max_bucket_reso": s.max_bucket, "bucket_no_upscale": s.bucket_no_upscale,
            "bucket_info": self.data.plan.bucket_info(s.repeats), "resolution": s.resolution,
            "dataset_dirs": dataset_dirs(self.project, s.repeats, len(self.data.items)),
            "tag_frequency": metadata_tag_frequency(self.project), "trigger_phrase": activation_tags(self.project) or None,
        }

    def save_lora(self, path: Path, epoch: int, step: int) -> Path:
        s = self.settings
        info = lora_file.NetworkInfo(s.dim, s.alpha, s.conv_dim if s.network == "locon" else None,
                                     s.conv_alpha if s.network == "locon" else None)
        metadata = lora_file.lora_metadata(self.host.kind, self.parameterization, info, self._run_facts(epoch, step))
        tensors = lora_file.to_output_names(self.network.lora_state_dict(), self.host.kind, self.network.module_paths())
        lora_file.save_lora(path, tensors, metadata, SAVE_DTYPES[s.save_precision])
        lora_file.write_card(path, ", ".join(activation_tags(self.project)), 0, self.host.kind)
        self.result.files.append(path)
        return path

    def save_epoch(self, epoch: int, step: int) -> None:
        path = self.save_lora(self.lora_dir / f"{self.name}-{epoch:06d}.safetensors", epoch, step)
        self.epoch_files.append(path.name)
        keep = self.settings.keep_last_n_epochs
        while keep and len(self.epoch_files) > keep:  # kohya's save_last_n_epochs, for this run's files only
            old = self.lora_dir / self.epoch_files.pop(0)
            old.unlink(missing_ok=True)
            lora_file.card_path(old).unlink(missing_ok=True)

    def save_state(self, step: int, epoch: int, batch: int) -> None:
        write_state(self.project, {
            "version": 1, "name": self.name, "settings": self.settings.to_dict(), "kind": self.host.kind,
            "model_name": self.host.model_name, "step": step, "epoch": epoch, "batch": batch,
            "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            "session_id": self.session_id, "started_at": self.started_at, "losses": self.losses[-100:],
            "total_steps": self.total_steps, "dataset": self._dataset_fingerprint(), "epoch_files": self.epoch_files,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        })

    def load_state(self) -> dict:
        state = read_state(self.project)
        if state.get("kind") != self.host.kind:
            raise LoraMakerError(f"the stopped run trained a {state.get('kind')} model, this one is {self.host.kind}: "
                                 "load that model to resume, or start a new run")
        changed = changed_settings(state["settings"], self.settings, self.host.kind, self.project)
        if changed:
            raise LoraMakerError(f"the stopped run used other settings ({', '.join(changed)}): resume with its "
                                 "settings, or start a new run")
        if state.get("model_name") != self.host.model_name:
            raise LoraMakerError(f"the stopped run trained on {state.get('model_name')}, not {self.host.model_name}: "
                                 "load that model to resume, or start a new run")
        if state.get("dataset") != self._dataset_fingerprint() or state.get("total_steps") != self.total_steps:
            raise LoraMakerError("the dataset changed since the run stopped (images or captions): start a new run")
        return state

    def _dataset_fingerprint(self) -> str:
        import hashlib

        text = "\n".join(f"{item.image.name}\t{item.width}x{item.height}\t{item.caption}" for item in self.data.items)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
