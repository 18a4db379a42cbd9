"""Presets by purpose and VRAM tier: names that round-trip, settings that validate for every model
kind, tiers that order memory and fit their card, step targets inside the guide's 250-1000."""

from __future__ import annotations

import pytest

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.training import presets, vram
from lora_trainer_ext.training.plan import GUIDE_STEPS, step_arithmetic
from lora_trainer_ext.training.presets import PURPOSES, VRAM_TIERS, apply_preset, apply_preset_with_notes
from lora_trainer_ext.training.settings import TrainSettings, optimizer_available

KINDS = (SD1, SD2, SDXL)


def test_names_round_trip_and_bad_names_are_refused():
    names = presets.preset_names()
    assert len(set(names)) == len(PURPOSES) * len(VRAM_TIERS) and "character, 12 GB" in names
    assert [presets.parse_preset_name(n) for n in names] == [(p, gb) for p in PURPOSES for gb in VRAM_TIERS]
    assert presets.parse_preset_name(" Style,16gb ") == ("style", 16)
    for bad in ("", "style", "hero, 12 GB", "style, 10 GB", "style, twelve GB"):
        with pytest.raises(LoraMakerError, match="unknown training preset"):
            presets.parse_preset_name(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_every_preset_validates(kind):
    for purpose in PURPOSES:
        for gb in VRAM_TIERS:
            for images in (None, 20):
                s = apply_preset(TrainSettings(), purpose, gb, kind, images)
                s.validate(kind)
                s.resolved(kind).validate(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_tiers_order_memory_and_fit_their_card(kind):
    for purpose in PURPOSES:
        needs = []
        for gb in VRAM_TIERS:
            applied = apply_preset_with_notes(TrainSettings(), purpose, gb, kind)
            estimate = vram.estimate(kind, applied.settings)
            needs.append(estimate.total_gib)
            if kind == SDXL and gb == 8:
                assert estimate.total_gib > gb * presets.BUDGET
                assert any("not realistic" in note for note in applied.notes)
            else:
                assert estimate.total_gib <= gb * presets.BUDGET, (purpose, gb)
                assert vram.fits(estimate, gb * 0.97).startswith("fits")  # cards report a little under their size
                assert len(applied.notes) == 2
        assert needs == sorted(needs) and needs[0] < needs[-1], (purpose, needs)


def test_memory_knobs_by_tier():
    eight_bit = optimizer_available("AdamW8bit")
    small = apply_preset(TrainSettings(), "character", 8, SD1)
    big = apply_preset(TrainSettings(), "character", 24, SD1)
    assert small.optimizer == ("AdamW8bit" if eight_bit else "AdamW") and small.gradient_checkpointing
    assert (big.optimizer, big.gradient_checkpointing, big.batch_size) == ("AdamW", False, 4)
    assert apply_preset(TrainSettings(), "character", 12, SDXL).optimizer == ("AdamW8bit" if eight_bit else "AdamW")
    xl = [apply_preset(TrainSettings(), "style", gb, SDXL) for gb in VRAM_TIERS]
    assert [s.resolution for s in xl] == [768, None, None, None] and all(s.gradient_checkpointing for s in xl)
    assert [s.batch_size for s in xl] == sorted(s.batch_size for s in xl)
    # a full-precision choice is brought back to fp16; bf16 is kept
    assert apply_preset(TrainSettings(mixed_precision="no"), "concept", 12, SD1).mixed_precision == "fp16"
    assert apply_preset(TrainSettings(mixed_precision="bf16"), "concept", 12, SD1).mixed_precision == "bf16"


def test_learning_knobs_by_purpose():
    character = apply_preset(TrainSettings(), "character", 12, SD1)
    style = apply_preset(TrainSettings(), "style", 12, SD1)
    concept = apply_preset(TrainSettings(), "concept", 12, SD1)
    assert (character.network, character.dim, character.alpha, character.unet_lr, character.text_encoder_lr) == \
        ("lora", 16, 8.0, 5e-4, 1e-4)  # the guide's recipe
    assert not character.flip_aug and style.flip_aug and concept.flip_aug
    assert (style.network, style.conv_dim, style.conv_alpha, style.text_encoder_lr) == ("locon", 8, 4.0, 0.0)
    assert style.unet_lr < character.unet_lr and style.epochs > character.epochs
    assert concept.dim < character.dim
    for purpose in PURPOSES:
        xl = apply_preset(TrainSettings(), purpose, 16, SDXL)
        assert xl.text_encoder_lr == (0 if purpose == "style" else 6e-5) and xl.unet_lr <= 3e-4  # the XL trainer's


def test_only_the_presets_knobs_change():
    mine = TrainSettings(seed=7, keep_tokens=2, clip_skip=2, save_every_n_epochs=2, cache_latents="disk",
                         optimizer="Prodigy", unet_lr=1.0, text_encoder_lr=1.0, max_steps=1234)
    s = apply_preset(mine, "character", 16, SD1)
    assert (s.seed, s.keep_tokens, s.clip_skip, s.save_every_n_epochs, s.cache_latents) == (7, 2, 2, 2, "disk")
    assert s.optimizer == "AdamW" and s.unet_lr == 5e-4  # rates that suit the optimizer the preset picks
    assert s.max_steps is None  # counted in epochs again


@pytest.mark.parametrize("kind", [SD1, SDXL])
def test_repeats_and_epochs_aim_inside_the_guides_steps(kind):
    low, high = GUIDE_STEPS
    for purpose in PURPOSES:
        for images in (5, 12, 20, 40, 100, 300, 1000):
            s = apply_preset(TrainSettings(), purpose, 24, kind, images)
            steps = step_arithmetic(images, s).total_steps
            assert low <= steps <= high, (purpose, images, s.repeats, s.epochs, steps)
            assert s.repeats == 1 or s.epochs == apply_preset(TrainSettings(), purpose, 24, kind).epochs
    untouched = apply_preset(TrainSettings(repeats=3, epochs=7), "style", 12, SD1)  # no image count: repeats kept
    assert (untouched.repeats, untouched.epochs) == (3, 15)


def test_tier_for_a_cards_memory():
    assert [presets.tier_for_memory(g) for g in (4.0, 7.6, 10.0, 11.7, 15.9, 23.6, 79.1)] == [8, 8, 8, 12, 16, 24, 24]


def test_unknown_purpose_tier_or_kind_is_refused():
    for args, message in ((("hero", 12, SD1), "unknown purpose"), (("style", 10, SD1), "unknown VRAM tier"),
                          (("style", 12, "sd3"), "unknown model kind")):
        with pytest.raises(LoraMakerError, match=message):
            apply_preset(TrainSettings(), *args)
