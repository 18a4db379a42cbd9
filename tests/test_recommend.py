"""The recommendation: per-epoch verdicts in the guide's words (undercooked, overcooked, overfit) on
synthetic score tables, the pick and its reasons, and the whole chain from real images through the
real (tiny ONNX) tagger and the scores."""

from __future__ import annotations

import random

import numpy as np
import tiny_onnx
from PIL import Image

from lora_trainer_ext.dataset.tagger import load_tagger
from lora_trainer_ext.grids.plan import Epoch, GridPlan
from lora_trainer_ext.grids.recommend import recommend
from lora_trainer_ext.grids.scoring import Score, score_cells

WEIGHTS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def table(epochs, likeness, flexibility=lambda e, w: None, overcooked=lambda e, w: 0.0, broken=lambda e, w: False,
          weights=WEIGHTS) -> list[Score]:
    """A main layer (likeness) and a flexibility layer (likeness and flexibility) per epoch x weight."""
    scores = []
    for layer in (0, 1):
        for row, e in enumerate(epochs):
            for col, w in enumerate(weights):
                bad = broken(e, w)
                scores.append(Score(layer, row, col, e, w, likeness(e, w), flexibility(e, w) if layer else None,
                                    1.0 if bad else overcooked(e, w), 0.0, 1.0, bad, "black" if bad else ""))
    return scores


def growing(e, w):
    return 0.1 if w == 0 else min(1.0, e * w / 4)


def test_undercooked_then_good_then_overfit():
    flex = {6: 0.6, 7: 0.3, 8: 0.0}
    scores = table(range(1, 9), growing, lambda e, w: 1.0 if w == 0 else flex.get(e, 1.0),
                   lambda e, w: 0.8 if e >= 5 and w >= 0.9 else 0.0)
    r = recommend(scores)
    assert r.per_epoch_verdicts == {1: "undercooked", 2: "undercooked", 3: "good", 4: "good", 5: "good", 6: "good",
                                    7: "overfit", 8: "overfit"}
    # Epochs 4 (weight 1) and 5 (weight 0.8) are both perfect: the earlier epoch wins.
    assert (r.epoch, r.weight) == (4, 1.0)
    assert r.reasons[0] == "epoch 4 at weight 1: likeness 100%, flexibility 100%, overcooking 0%"
    assert any(t.startswith("undercooked at epochs 1, 2: the core tags show at no weight") for t in r.reasons)
    assert any(t.startswith("overfit at epochs 7, 8: the likeness holds but the flexibility prompt's tags collapse "
                            "(down to 0% from 100%)") for t in r.reasons)
    assert not any("overcooked at" in t for t in r.reasons)


def test_overcooked_late_epochs_and_burnt_high_weights():
    scores = table(range(1, 7), lambda e, w: 0.1 if w == 0 else 0.9,
                   overcooked=lambda e, w: 0.9 if (e >= 5 and w > 0) or (e == 3 and w >= 0.9) else 0.0,
                   broken=lambda e, w: e == 6 and w == 1.0)
    r = recommend(scores)
    assert r.per_epoch_verdicts == {1: "good", 2: "good", 3: "good", 4: "good", 5: "overcooked", 6: "overcooked"}
    assert (r.epoch, r.weight) == (1, 0.8)  # all equal: the earliest epoch, the weight nearest 0.8
    assert any(t == "overcooked at epochs 5, 6: colour clipping or artefacts at most weights; black, NaN or fully "
                    "burnt images at epoch 6" for t in r.reasons)


def test_the_weights_that_overcook_at_the_chosen_epoch_are_named():
    scores = table([1, 2], lambda e, w: 0.1 if w == 0 else (1.0 if e == 2 else 0.3),
                   overcooked=lambda e, w: 0.7 if w >= 0.9 else 0.0)
    r = recommend(scores)
    assert (r.epoch, r.weight) == (2, 0.8) and r.per_epoch_verdicts == {1: "undercooked", 2: "good"}
    assert "at epoch 2, weights from 0.9 overcook" in r.reasons


def test_everything_undercooked_suggests_training_longer():
    r = recommend(table([1, 2, 3], lambda e, w: 0.1 * e * w))
    assert set(r.per_epoch_verdicts.values()) == {"undercooked"}
    assert (r.epoch, r.weight) == (3, 1.0)  # the strongest there is
    assert r.reasons[-1] == "no epoch is good yet: train longer (more epochs or repeats) or raise the learning rate"


def test_everything_overcooked_suggests_a_lower_learning_rate():
    r = recommend(table([1, 2], lambda e, w: 0.9, overcooked=lambda e, w: 0.0 if w == 0 else 0.6 + 0.1 * e * w))
    assert set(r.per_epoch_verdicts.values()) == {"overcooked"}
    assert (r.epoch, r.weight) == (1, 0.5)  # the least burnt
    assert r.reasons[-1] == "no epoch is good: lower the learning rate or the repeats and train again"


def test_overfit_everywhere_suggests_fewer_epochs():
    r = recommend(table([1, 2], lambda e, w: 1.0, lambda e, w: 1.0 if w == 0 else 0.2))
    assert set(r.per_epoch_verdicts.values()) == {"overfit"}
    assert r.reasons[-1] == "no epoch is good: train fewer epochs, lower the learning rate, or add more varied images"


def test_nothing_to_recommend():
    r = recommend(table([1, 2], lambda e, w: 0.0, broken=lambda e, w: w > 0))
    assert (r.epoch, r.weight) == (None, None) and set(r.per_epoch_verdicts.values()) == {"overcooked"}
    assert "every image with the LoRA is broken" in r.reasons[-1]
    r = recommend(table([1, 2], lambda e, w: 0.0, weights=(0.0,)))
    assert (r.epoch, r.weight, r.per_epoch_verdicts) == (None, None, {})
    assert r.reasons == ["the grid has no rendered cell with the LoRA: add a weight above 0"]


def test_without_likeness_the_pick_rests_on_overcooking():
    r = recommend(table([1, 2], lambda e, w: None, overcooked=lambda e, w: 0.3 * (e - 1)))
    assert (r.epoch, r.weight) == (1, 0.8)
    assert any(t.startswith("likeness is unknown") for t in r.reasons)
    assert r.reasons[0] == "epoch 1 at weight 0.8: likeness unknown, flexibility unknown, overcooking 0%"


def test_the_rule_is_deterministic():
    scores = table(range(1, 9), growing, lambda e, w: 1.0 - 0.1 * e, lambda e, w: 0.2 * w)
    first = recommend(scores)
    for seed in range(5):
        shuffled = list(scores)
        random.Random(seed).shuffle(shuffled)
        assert recommend(shuffled) == first


# -- from real images -------------------------------------------------------------------------------

def tinted(red: int, green: int = 0, blue: int = 0, size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), (red, green, blue))
    image.paste((red * 3 // 4, green * 3 // 4, blue * 3 // 4), (0, 0, 12, 12))
    return image


def test_from_real_images_through_the_tagger(tmp_path):
    tagger = load_tagger(str(tiny_onnx.write_tagger(tmp_path / "tiny-tagger")))
    epochs = [Epoch(n, f"mychar-{n:06d}", f"mychar-{n:06d}.safetensors") for n in (1, 2, 3)]
    plan = GridPlan(epochs, [0.0, 0.5, 1.0], [("main", "mychar", 1)])
    noise = np.random.default_rng(0).normal(0, 90, (64, 64, 3))
    burnt = Image.fromarray(np.clip(np.asarray(tinted(255), dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    looks = {
        0.0: tinted(0, 0, 255),  # the base model draws no red character
        1: tinted(0, 0, 255),  # epoch 1: no effect yet
        2: tinted(255),  # epoch 2: the character
        3: burnt,  # epoch 3: the character in noise and artefacts
    }
    images = [looks[0.0] if c.weight == 0 else looks[c.epoch.number] for c in plan.cells()]
    scores = score_cells(plan.cells(), images, tagger.predict(images), core_tags=["red theme", "solo"])
    r = recommend(scores)
    assert r.per_epoch_verdicts == {1: "undercooked", 2: "good", 3: "overcooked"}
    assert (r.epoch, r.weight) == (2, 1.0)  # both weights are perfect: the one nearer 0.8
    assert r.reasons[0] == "epoch 2 at weight 1: likeness 100%, flexibility unknown, overcooking 0%"
    assert [s.likeness for s in scores if s.epoch == 1] == [0.0, 0.0, 0.0]
    assert all(s.overcooked >= 0.5 for s in scores if s.epoch == 3 and s.weight > 0)
