"""The optimizers and schedules the notebooks offer: arguments as users write them, each optimizer and
schedule training a real LoRA on the tiny SD1 host with a falling loss on a fixed batch, the VRAM table's
state sizes against the states the optimizers really keep, and the recommended values the presets apply."""

from __future__ import annotations

import pytest
import torch
from tiny_hosts import make_checkpoint

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.hosts.standalone import load_checkpoint
from lora_trainer_ext.training import objective
from lora_trainer_ext.training.model_mode import prepared_for_training
from lora_trainer_ext.training.network import Network, NetworkConfig
from lora_trainer_ext.training.optimizers import (
    OPTIMIZER_TABLE,
    OPTIMIZERS,
    check_args,
    describe,
    make_optimizer,
    optimizer_available,
    parse_args,
    recommended_args,
)
from lora_trainer_ext.training.presets import apply_preset_with_notes, recommended_values
from lora_trainer_ext.training.schedules import SCHEDULERS, make_scheduler
from lora_trainer_ext.training.settings import TrainSettings

pytestmark = pytest.mark.timeout(300)


# --- arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("weight_decay=0.1 betas=0.9,0.99", {"weight_decay": 0.1, "betas": (0.9, 0.99)}),
    # the SD1.5 notebook's comma-separated form, prodigyopt's names and a list in brackets
    ("decouple=True,weight_decay=0.01,betas=[0.9,0.999], d_coef=2 use_bias_correction=true",
     {"weight_decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.999), "d_coef": 2, "bias_correction": True}),
    ("betas=(0.9, 0.99)  eps=1e-8", {"betas": (0.9, 0.99), "eps": 1e-8}),
    ("", {}),
    (None, {}),
])  # fmt: skip
def test_arguments_are_read_as_users_write_them(text, expected):
    assert parse_args(text) == expected


@pytest.mark.parametrize("text, message", [
    ("weight_decay", "key=value pairs"),
    ("0.1", "key=value pairs"),
    ("weight_decay=", "has no value"),
    ("weight_decay=heavy", "is not a number"),
])  # fmt: skip
def test_unreadable_arguments_say_what_to_write(text, message):
    with pytest.raises(LoraMakerError, match=message):
        parse_args(text)
    with pytest.raises(LoraMakerError, match=message):  # and the settings check says the same, before any run
        TrainSettings(optimizer_args=text).validate()


def test_arguments_an_optimizer_does_not_take_are_refused_with_the_close_ones():
    with pytest.raises(LoraMakerError, match="Prodigy has no argument 'd_coeff': did you mean d_coef"):
        check_args("Prodigy", {"d_coeff": 2})
    with pytest.raises(LoraMakerError, match="unet_lr and text_encoder_lr"):
        check_args("AdamW", {"lr": 1})
    for name in OPTIMIZERS:
        if optimizer_available(name):  # every recommendation is taken by the installed library
            for kind in (SD1, SDXL):
                check_args(name, parse_args(recommended_args(name, kind)))


def test_the_file_names_the_class_and_its_arguments_as_kohya_writes_them():
    assert describe("AdamW", {"weight_decay": 0.1, "betas": (0.9, 0.99)}) == \
        "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    assert describe("CAME", {}).endswith(".CAME") and describe("CAME", {}).startswith("pytorch_optimizer.")


# --- training: a real LoRA on the tiny SD1 host ----------------------------------------------------------


def _fixed(folder, kind: str):
    """A tiny host of `kind` and a fixed batch (latents, noise, timesteps)."""
    host = load_checkpoint(make_checkpoint(folder, kind))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    return host, latents, noise, torch.tensor([100, 300, 500, 700])


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return _fixed(tmp_path_factory.mktemp("sd1"), SD1)


@pytest.fixture(scope="module")
def fixed_linear(tmp_path_factory):
    """SD2's tiny host: every LoRA weight a matrix (SD1's 1x1-conv projections keep unfactored statistics)."""
    return _fixed(tmp_path_factory.mktemp("sd2"), SD2)


def _train_fixed(fixed, optimizer: str, unet_lr: float, te_lr: float, args: dict, scheduler="constant",
                 steps=8) -> tuple[list[float], torch.optim.Optimizer, Network]:
    host, latents, noise, t = fixed
    torch.manual_seed(0)
    network = Network(host, NetworkConfig("lora", 4, 4.0), train_text_encoder=True)
    opt = make_optimizer(optimizer, network.parameter_groups(unet_lr, te_lr), args)
    schedule = make_scheduler(opt, scheduler, steps, warmup_steps=1, cycles=2)
    noisy = objective.add_noise(latents, noise, t, host.alphas_cumprod)
    wanted = objective.target(latents, noise, t, host.alphas_cumprod, host.parameterization)
    before = [[p.detach().clone() for p in group["params"]] for group in opt.param_groups]
    losses = []
    network.attach()
    try:
        with prepared_for_training(host):  # the trainer's model state: no ldm checkpointing, frozen weights
            network.train()
            for _ in range(steps + 1):  # the last pass only measures
                opt.zero_grad(set_to_none=True)
                cond = host.conditioning(["mychar, 1girl, red hair, smile"] * len(latents))
                loss = objective.loss(host.apply_model(noisy, t, cond), wanted)
                losses.append(float(loss))
                if len(losses) <= steps:
                    loss.backward()
                    opt.step()
                    schedule.step()
    finally:
        network.detach()
    for group, start in zip(opt.param_groups, before):  # both groups learned: the UNet's and the text encoder's
        assert any(not torch.equal(p, p0) for p, p0 in zip(group["params"], start)), (optimizer, group["name"])
    return losses, opt, network


# Rates that show a fall in 8 steps on the tiny model (the rest train at 1e-2); Prodigy and D-Adaptation
# start from a larger first step estimate (d0) than their 1e-6, which takes hundreds of steps to grow.
RATES = {"Prodigy": 1.0, "DAdaptAdam": 1.0, "Lion": 3e-3, "CAME": 3e-2}
FIRST_STEP = {"Prodigy": {"d0": 1e-3}, "DAdaptAdam": {"d0": 1e-4}}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_with_a_falling_loss(fixed, name):
    if not optimizer_available(name):
        pytest.skip(f"{OPTIMIZER_TABLE[name].package} is not installed")
    lr = RATES.get(name, 1e-2)
    args = {**parse_args(recommended_args(name, SD1)), **FIRST_STEP.get(name, {})}
    losses, opt, network = _train_fixed(fixed, name, lr, lr / 5, args)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.97 * losses[0], (name, losses)
    assert [g["name"] for g in opt.param_groups] == ["unet", "text_encoder"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_schedule_trains_with_a_falling_loss(fixed, scheduler):
    losses, opt, _ = _train_fixed(fixed, "AdamW", 1e-2, 2e-3, {}, scheduler=scheduler)
    assert losses[-1] < 0.97 * losses[0], (scheduler, losses)
    # each group keeps its own rate under every schedule: the text encoder's stays a fifth of the UNet's
    unet, text = (g["lr"] for g in opt.param_groups)
    assert text == pytest.approx(unet / 5, abs=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_vram_table_holds_the_state_the_optimizer_keeps(fixed_linear, name):
    """Bytes of optimizer state per trained weight, measured after a step, against the estimate's."""
    if not optimizer_available(name):
        pytest.skip(f"{OPTIMIZER_TABLE[name].package} is not installed")
    _, opt, network = _train_fixed(fixed_linear, name, RATES.get(name, 1e-2), 1e-3,
                                   parse_args(recommended_args(name, SD1)), steps=1)
    weights = sum(p.numel() for p in network.parameters())
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.numel() > 1)
    measured = state / weights
    if name == "AdamW8bit":  # small tensors keep 32-bit states in bitsandbytes (its min_8bit_size): not on a real model
        assert measured <= 8.5
    else:
        expected = OPTIMIZER_TABLE[name].bytes_per_weight(4)  # the network's rank
        assert expected * 0.8 <= measured <= expected * 1.25, (name, measured, expected)


# --- the recommended values -----------------------------------------------------------------------


def test_the_preset_applies_the_notebooks_recommended_values_visibly():
    applied = apply_preset_with_notes(TrainSettings(), "character", 24, SDXL, optimizer="Prodigy")
    s = applied.settings
    assert (s.optimizer, s.unet_lr, s.text_encoder_lr, s.alpha) == ("Prodigy", 0.75, 0.75, float(s.dim))
    assert s.optimizer_args == recommended_args("Prodigy", SDXL) and "d_coef=2" in s.optimizer_args
    assert s.lr_scheduler == "cosine_with_restarts"  # the XL trainer keeps the schedule
    assert any("recommended values" in note and "d_coef=2" in note for note in applied.notes)

    sd1 = apply_preset_with_notes(TrainSettings(), "style", 12, SD1, optimizer="DAdaptAdam").settings
    assert (sd1.unet_lr, sd1.text_encoder_lr, sd1.lr_scheduler) == (0.5, 0.0, "constant_with_warmup")  # style: UNet only
    assert (sd1.alpha, sd1.conv_alpha) == (float(sd1.dim), float(sd1.conv_dim))

    lion = recommended_values(TrainSettings(), "Lion", SD1)
    assert lion["unet_lr"] == pytest.approx(5e-4 / 3) and lion["text_encoder_lr"] == pytest.approx(1e-4 / 3)
    xl_adamw = apply_preset_with_notes(TrainSettings(), "character", 24, SDXL, optimizer="AdamW8bit").settings
    assert (xl_adamw.optimizer, xl_adamw.optimizer_args) == ("AdamW8bit", "weight_decay=0.1 betas=0.9,0.99")
    with pytest.raises(LoraMakerError, match="unknown optimizer"):
        apply_preset_with_notes(TrainSettings(), "character", 24, SDXL, optimizer="SGD")


def test_unset_arguments_resolve_to_the_recommended_ones_for_the_model():
    s = TrainSettings(optimizer="AdamW")
    assert s.resolved(SD1).optimizer_args == "weight_decay=0.01"  # the SD1.5 trainer's (the library's)
    assert s.resolved(SDXL).optimizer_args == "weight_decay=0.1 betas=0.9,0.99"  # the XL trainer's
    assert s.replace(optimizer_args="weight_decay=0").resolved(SDXL).optimizer_args == "weight_decay=0"
    advice = TrainSettings(optimizer="DAdaptAdam", unet_lr=1e-4).validate(SDXL)
    assert any("about 0.75" in a for a in advice)
