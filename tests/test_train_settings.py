from __future__ import annotations

import importlib.util
import json

import pytest

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.training import settings as train_settings
from lora_trainer_ext.training.optimizers import OPTIMIZER_TABLE, OPTIMIZERS, optimizer_available
from lora_trainer_ext.training.plan import step_arithmetic
from lora_trainer_ext.training.settings import TrainSettings, parse_set


def test_defaults_are_the_guides():
    s = TrainSettings()
    assert (s.unet_lr, s.text_encoder_lr) == (5e-4, 1e-4)
    assert (s.lr_scheduler, s.lr_cycles, s.warmup_ratio) == ("cosine_with_restarts", 3, 0.05)
    assert (s.network, s.dim, s.alpha, s.conv_dim, s.conv_alpha) == ("lora", 16, 8, 8, 4)
    assert (s.repeats, s.epochs, s.batch_size, s.save_every_n_epochs, s.keep_last_n_epochs) == (10, 10, 2, 1, 0)
    assert (s.buckets, s.bucket_step, s.min_bucket, s.shuffle_tags, s.max_grad_norm) == (True, 64, 256, True, 1.0)
    assert s.validate() == []


def test_resolved_fills_values_by_model_and_dataset(project):
    sd1 = TrainSettings().resolved(SD1)
    assert (sd1.resolution, sd1.max_bucket, sd1.keep_tokens, sd1.gradient_checkpointing) == (512, 1024, 0, False)
    xl = TrainSettings().resolved(SDXL)
    assert (xl.resolution, xl.max_bucket, xl.gradient_checkpointing) == (1024, 2048, True)
    assert TrainSettings(resolution=768).resolved(SD2).resolution == 768

    project.update_settings(dataset={"activation_tags": ["zzz", "yyy"], "keep_tokens": 2})
    assert TrainSettings().resolved(SD1, project).keep_tokens == 2
    assert TrainSettings(keep_tokens=0).resolved(SD1, project).keep_tokens == 0  # set explicitly: wins
    with pytest.raises(LoraMakerError):
        TrainSettings().resolved("flux")


def test_parse_set_converts_by_field_type():
    values = parse_set(
        ["epochs=4", "network=LoCon", "flip_aug=yes", "shuffle_tags=0", "unet_lr=1e-4", "resolution=none",
         "optimizer=adamw", "max-steps=600", "alpha=4", "dim=8.0"]
    )  # fmt: skip
    assert values == {
        "epochs": 4, "network": "locon", "flip_aug": True, "shuffle_tags": False, "unet_lr": 1e-4,
        "resolution": None, "optimizer": "AdamW", "max_steps": 600, "alpha": 4.0, "dim": 8,
    }  # fmt: skip
    assert isinstance(values["alpha"], float) and isinstance(values["dim"], int)
    settings = TrainSettings().replace(**values)
    assert settings.network == "locon" and settings.max_steps == 600


@pytest.mark.parametrize(
    "pair, message",
    [
        ("epoch=4", "did you mean epochs"),
        ("unet_learning_rate=1", "unet_lr"),
        ("epochs=four", "whole number"),
        ("dim=1.5", "whole number"),
        ("flip_aug=maybe", "true or false"),
        ("unet_lr=fast", "a number"),
        ("unet_lr=nan", "a number"),
        ("optimizer=SGD", "AdamW, AdamW8bit, Prodigy, DAdaptAdam, Lion, Adafactor, CAME"),
        ("epochs=", "whole number"),
        ("epochs", "key=value"),
    ],
)
def test_parse_set_errors_say_what_is_wrong(pair, message):
    with pytest.raises(LoraMakerError, match=message):
        parse_set([pair])


def test_from_dict_checks_types_from_the_settings_file():
    assert TrainSettings.from_dict({"dim": 32, "unet_lr": 1, "flip_aug": True}).unet_lr == 1.0
    for bad in ({"dim": "big"}, {"flip_aug": 3}, {"dim": True}, {"nope": 1}):
        with pytest.raises(LoraMakerError):
            TrainSettings.from_dict(bad)
    with pytest.raises(LoraMakerError):
        TrainSettings.from_dict(["dim", 3])


def test_save_and_load_through_the_project_settings(project):
    project.update_settings(dataset={"keep_tokens": 1})
    assert train_settings.load(project) == TrainSettings()
    chosen = TrainSettings(epochs=6, network="locon", resolution=None, flip_aug=True)
    train_settings.save(project, chosen)
    assert train_settings.load(project) == chosen
    stored = json.loads(project.settings_path.read_text(encoding="utf-8"))
    assert stored["dataset"] == {"keep_tokens": 1}  # other sections untouched
    assert stored["train"] == {"epochs": 6, "network": "locon", "flip_aug": True}  # what differs from the defaults


def test_what_the_user_did_not_change_follows_the_model_family(project):
    sdxl = train_settings.defaults(SDXL)
    assert (sdxl.repeats, sdxl.batch_size, sdxl.unet_lr, sdxl.dim, sdxl.alpha, sdxl.conv_dim, sdxl.conv_alpha) == \
        (2, 4, 3e-4, 8, 4.0, 16, 8.0)  # the XL trainer's
    assert (sdxl.min_snr_gamma, sdxl.multires_noise_iterations, sdxl.multires_noise_discount, sdxl.flip_aug) == \
        (8.0, 6, 0.3, False)
    assert sdxl.resolved(SDXL).max_bucket == 4096 and sdxl.resolved(SDXL).gradient_checkpointing
    assert train_settings.defaults(SD2) == train_settings.defaults(None) == TrainSettings()  # SD1.5's
    train_settings.save(project, sdxl.replace(epochs=6, dim=32), SDXL)  # chosen with an SDXL model loaded
    assert project.settings()["train"] == {"epochs": 6, "dim": 32}
    on_sd1 = train_settings.load(project, SD1)
    assert (on_sd1.epochs, on_sd1.dim, on_sd1.repeats, on_sd1.unet_lr) == (6, 32, 10, 5e-4)  # SD1's for the rest
    assert train_settings.load(project, SDXL) == sdxl.replace(epochs=6, dim=32)
    assert "repeats 2, batch_size 4" in train_settings.family_note(SDXL) and train_settings.family_note(SD1) == ""


def test_load_names_the_file_when_it_holds_a_bad_value(project):
    project.update_settings(train={"epochz": 3})
    with pytest.raises(LoraMakerError, match="settings.json.*epochs"):
        train_settings.load(project)


def test_validate_lists_every_impossible_value():
    bad = TrainSettings(dim=0, unet_lr=-1, batch_size=0, caption_dropout=1.5, warmup_ratio=1.0, max_steps=0)
    with pytest.raises(LoraMakerError) as e:
        bad.validate()
    text = str(e.value)
    for name in ("dim", "unet_lr", "batch_size", "caption_dropout", "warmup_ratio", "max_steps"):
        assert name in text
    assert "\n" not in text


def test_nothing_to_train_and_locon_needs_conv_dim():
    with pytest.raises(LoraMakerError, match="nothing would train"):
        TrainSettings(unet_lr=0, text_encoder_lr=0).validate()
    TrainSettings(unet_lr=0).validate()  # text encoder only is fine
    with pytest.raises(LoraMakerError, match="conv_dim"):
        TrainSettings(network="locon", conv_dim=0).validate()


def test_resolution_multiple_depends_on_the_model():
    s = TrainSettings(resolution=992, bucket_step=32, min_bucket=256, max_bucket=1984)
    assert s.validate(SDXL) == []  # SDXL: multiples of 32
    with pytest.raises(LoraMakerError, match="multiple of 64 for sd1"):
        s.validate(SD1)
    with pytest.raises(LoraMakerError, match="resolution 2048 must lie between"):
        TrainSettings(resolution=2048).resolved(SD1).replace(max_bucket=1024).validate(SD1)
    with pytest.raises(LoraMakerError, match="min_bucket must be a multiple"):
        TrainSettings(min_bucket=300).validate(SD1)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if OPTIMIZER_TABLE[n].package])
def test_optional_optimizers_need_their_package(name):
    spec = OPTIMIZER_TABLE[name]
    installed = importlib.util.find_spec(spec.module.split(".")[0]) is not None
    assert optimizer_available(name) == installed
    settings = TrainSettings(optimizer=name, unet_lr=1.0, text_encoder_lr=1.0)
    if installed:
        settings.validate()
    else:
        with pytest.raises(LoraMakerError, match=f"pip install {spec.package}"):
            settings.validate()


def test_adamw_is_always_there_and_unknown_optimizers_are_not():
    assert optimizer_available("AdamW")
    assert not optimizer_available("SGD")


def test_advice_for_legal_but_odd_values():
    assert any("text_encoder_lr above unet_lr" in a for a in TrainSettings(unet_lr=1e-4, text_encoder_lr=5e-4).validate())


@pytest.mark.parametrize(
    "images, repeats, epochs, batch, steps",
    [(10, 10, 10, 2, 500), (20, 5, 10, 4, 250), (100, 1, 10, 4, 250), (1000, 1, 6, 8, 750)],
)
def test_the_guides_xl_examples_are_in_range(images, repeats, epochs, batch, steps):
    plan = step_arithmetic(images, TrainSettings(repeats=repeats, epochs=epochs, batch_size=batch))
    assert plan.total_steps == steps and plan.epochs == epochs
    assert plan.warnings == []
    assert plan.render() == f"{images} images x {repeats} repeats x {epochs} epochs / batch {batch} = {steps} steps"


def test_too_many_or_too_few_steps_say_which_way_to_go():
    many = step_arithmetic(40, TrainSettings())
    assert many.total_steps == 2000 and many.steps_per_epoch == 200
    assert many.render() == "40 images x 10 repeats x 10 epochs / batch 2 = 2000 steps"
    assert len(many.warnings) == 1 and "lower repeats or epochs" in many.warnings[0]
    few = step_arithmetic(5, TrainSettings(repeats=1, epochs=10, batch_size=2))
    assert few.steps_per_epoch == 3 and few.total_steps == 30  # a part-filled batch is still a step
    assert len(few.warnings) == 1 and "raise repeats or epochs" in few.warnings[0]


def test_every_epoch_the_default_grid_renders_is_kept_and_pruning_is_said():
    from lora_trainer_ext.training import presets

    style = presets.apply_preset(TrainSettings(), "style", 12, SD1, images=60)
    assert style.epochs > 10 and style.keep_last_n_epochs == 0  # the grid's default compares every epoch
    plan = step_arithmetic(20, TrainSettings(epochs=6, keep_last_n_epochs=3))
    assert plan.warnings == ["keep_last_n_epochs=3 deletes the first 2 of 5 epoch files as training goes on: the "
                             "grid can compare only the rest (0 keeps them all)"]  # epoch 6 is the final file
    assert step_arithmetic(20, TrainSettings(epochs=6, keep_last_n_epochs=5)).warnings == []
    assert step_arithmetic(20, TrainSettings(epochs=6, keep_last_n_epochs=3, save_every_n_epochs=2)).warnings == []


def test_warmup_follows_the_scheduler():
    assert step_arithmetic(10, TrainSettings()).warmup_steps == 25  # 500 x 5%
    assert step_arithmetic(10, TrainSettings(lr_scheduler="constant")).warmup_steps == 0


def test_buckets_add_the_steps_of_their_part_filled_batches():
    plan = step_arithmetic(7, TrainSettings(repeats=1, epochs=100, batch_size=2), bucket_sizes=[3, 3, 1])
    assert plan.steps_per_epoch == 2 + 2 + 1 and plan.total_steps == 500
    assert plan.render() == "7 images x 1 repeats x 100 epochs / batch 2 = 400 steps (500 with batches filled per bucket)"


def test_max_steps_replaces_epochs():
    plan = step_arithmetic(40, TrainSettings(max_steps=500))
    assert plan.total_steps == 500 and plan.epochs == 3 and plan.warnings == []
    assert plan.render().startswith("500 steps = about 3 epochs of 40 images x 10 repeats / batch 2")
    assert "max_steps" in step_arithmetic(40, TrainSettings(max_steps=5000)).warnings[0]


def test_zero_steps_is_an_error():
    with pytest.raises(LoraMakerError, match="no images"):
        step_arithmetic(0, TrainSettings())
    with pytest.raises(LoraMakerError, match="0 steps"):
        step_arithmetic(10, TrainSettings(epochs=0))
