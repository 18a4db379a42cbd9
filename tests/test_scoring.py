"""Cell scores on real pictures: overcooking grows with colour clipping and with high-frequency
artefacts and is ~0 for the baseline itself, broken images are flagged, and likeness/flexibility are
recalls of the tags a real (tiny ONNX) WD tagger predicts, checked against hand-made predictions too."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import tiny_onnx
from PIL import Image, ImageEnhance, ImageFilter

from lora_trainer_ext.dataset.tagger import Prediction, load_tagger
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.grids.plan import Epoch, GridPlan
from lora_trainer_ext.grids.scoring import (
    ImageStats,
    Score,
    artefact_score,
    broken_reason,
    clipped_share,
    clipping_score,
    overcooking,
    pixels,
    recall,
    score_cells,
    sort_scores,
)


def astronaut(size=256) -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)


def smooth(size=256, seed=0) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def fried(image: Image.Image, k: float) -> Image.Image:
    """Colour and contrast pushed k times: the deep-fried look of an overcooked LoRA."""
    return ImageEnhance.Contrast(ImageEnhance.Color(image).enhance(k)).enhance(k)


def noisy(image: Image.Image, sigma: float, seed=1) -> Image.Image:
    a = np.asarray(image, dtype=np.float64) + np.random.default_rng(seed).normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def cooked(image, baseline):
    return overcooking(ImageStats.of(image), ImageStats.of(baseline))


# -- images -----------------------------------------------------------------------------------------

def test_pixels_from_images_and_arrays():
    a = astronaut(32)
    assert pixels(a).shape == (32, 32, 3) and pixels(a).max() <= 1.0
    assert np.allclose(pixels(np.asarray(a)), pixels(a))
    assert np.allclose(pixels(np.asarray(a) / 255.0), pixels(a))
    assert pixels(a.convert("L")).shape == (32, 32, 3) and pixels(np.zeros((4, 5))).shape == (4, 5, 3)


def test_broken_images_are_flagged_and_overcooked():
    nan = np.asarray(astronaut(64), dtype=np.float32) / 255
    nan[10, 10, 1] = np.nan  # what a NaN latent decodes to, before it is cast to 8 bits
    assert broken_reason(pixels(nan)) == "NaN"
    black = Image.new("RGB", (64, 64))
    assert broken_reason(pixels(black)) == "black"
    assert broken_reason(pixels(Image.new("RGB", (64, 64), (128, 128, 128)))) == "blank"
    assert broken_reason(pixels(astronaut(64))) == "" and broken_reason(pixels(smooth(64))) == ""
    dark = np.asarray(astronaut(64)) // 8  # dark but a picture
    assert broken_reason(pixels(dark)) == ""
    for image in (nan, black):
        result = overcooking(ImageStats.of(image), ImageStats.of(astronaut(64)))
        assert result.score == 1.0 and result.problem


def test_identical_to_the_baseline_scores_zero():
    for image in (astronaut(), smooth()):
        result = cooked(image, image)
        assert result.score == 0.0 and result.clipping == 0.0 and result.artefacts == pytest.approx(1.0)


def test_a_different_drawing_of_the_same_prompt_is_not_overcooked():
    # Another photo (or a blurred one) against the baseline: neither clipping nor artefacts.
    assert cooked(Image.fromarray(skimage.data.chelsea()).resize((256, 256)), astronaut()).score == 0.0
    assert cooked(astronaut().filter(ImageFilter.GaussianBlur(2)), astronaut()).score == 0.0


def test_more_clipping_scores_higher():
    base = astronaut()
    shares = [clipped_share(pixels(fried(base, k))) for k in (1.0, 1.1, 1.2, 1.4, 2.0, 3.0)]
    scores = [cooked(fried(base, k), base).score for k in (1.0, 1.1, 1.2, 1.4, 2.0, 3.0)]
    assert shares == sorted(shares) and shares[-1] > shares[0] + 0.25
    assert scores == sorted(scores) and scores[0] == 0.0 and scores[-1] == 1.0
    assert 0.0 < scores[2] < 1.0  # a mild fry is in between
    # Dark saturated pixels are not clipping, however unstable their hue: a dark red image is clean.
    assert clipped_share(pixels(Image.new("RGB", (16, 16), (40, 0, 0)))) == 0.0
    assert clipped_share(pixels(Image.new("RGB", (16, 16), (255, 0, 0)))) == 1.0
    assert clipped_share(pixels(Image.new("RGB", (16, 16), (255, 255, 255)))) == 0.0  # white is not saturated


def test_more_high_frequency_noise_scores_higher():
    base = astronaut()
    results = [cooked(noisy(base, sigma), base) for sigma in (0, 10, 20, 40, 80)]
    ratios = [r.artefacts for r in results]
    scores = [r.score for r in results]
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1.0) and ratios[-1] > 8
    assert scores == sorted(scores) and scores[0] == 0.0 and scores[-1] == 1.0


def test_jpeg_artefacts_and_oversharpening_on_a_smooth_picture():
    base = smooth()
    assert cooked(jpeg(base, 5), base).artefacts > 8 and cooked(jpeg(base, 5), base).score == 1.0
    sharpened = base.filter(ImageFilter.UnsharpMask(2, 500, 0))
    assert 8 < cooked(sharpened, base).artefacts < cooked(noisy(sharpened, 3), base).artefacts
    assert cooked(sharpened, base).score == 1.0


def test_the_curves():
    assert clipping_score(0.30, 0.29) == 0.0  # only the excess counts
    assert clipping_score(0.02, 0.0) == 0.0 and clipping_score(0.135, 0.0) == pytest.approx(0.5)
    assert clipping_score(0.25, 0.0) == 1.0 and clipping_score(0.9, 0.0) == 1.0
    assert artefact_score(0.5) == artefact_score(2.0) == 0.0
    assert artefact_score(4.0) == pytest.approx(0.5) and artefact_score(8.0) == 1.0 and artefact_score(100) == 1.0
    assert artefact_score(float("nan")) == 0.0


def test_without_a_usable_baseline_only_clipping_counts():
    grainy = noisy(smooth(), 20)
    assert cooked(grainy, smooth()).score == 1.0
    alone = overcooking(ImageStats.of(grainy), None)  # no spectrum to compare with: clipping alone
    assert alone.artefacts == 1.0 and alone.score == clipping_score(ImageStats.of(grainy).clipped, 0.0) < 0.5
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    red.paste(astronaut(32), (0, 0))
    assert overcooking(ImageStats.of(red), ImageStats.of(Image.new("RGB", (64, 64)))).score == 1.0


# -- recall -----------------------------------------------------------------------------------------

def prediction(**general) -> Prediction:
    return Prediction({"general": 0.9}, general, {"hatsune_miku_(append)": 0.9, "kagamine_rin": 0.6})


def test_recall_on_hand_made_predictions():
    p = prediction(blue_hair=0.9, long_hair=0.3, smile=0.5, red_eyes=0.36)
    r = recall(["Blue Hair", "long hair", "smile", "red_eyes", "made up tag"], p)
    assert r.value == pytest.approx(3 / 4)  # the tag the tagger doesn't know is left out
    assert r.found == ("Blue Hair", "smile", "red_eyes") and r.missing == ("long hair",)
    assert r.unknown == ("made up tag",)
    assert recall(["smile", "red eyes"], p, threshold=0.4).value == 0.5
    assert recall([r"hatsune miku \(append\)", "kagamine rin"], p).value == 0.5  # characters: 0.85
    assert recall(["kagamine rin"], p, character_threshold=0.5).value == 1.0
    assert recall(["made up tag"], p).value is None and recall([], p).value is None
    assert recall(["smile", "smile"], p).value == 1.0


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return load_tagger(str(tiny_onnx.write_tagger(tmp_path_factory.mktemp("models") / "tiny-tagger")))


def tinted(red: int, green: int = 0, blue: int = 0, size=64) -> Image.Image:
    """A picture of one colour (what the tiny tagger tags), with a darker patch so it is no flat frame."""
    image = Image.new("RGB", (size, size), (red, green, blue))
    image.paste((red * 3 // 4, green * 3 // 4, blue * 3 // 4), (0, 0, 12, 12))
    return image


def test_likeness_and_flexibility_from_the_real_tagger(tagger):
    epochs = [Epoch(n, f"mychar-{n:06d}", f"mychar-{n:06d}.safetensors") for n in (1, 2)]
    plan = GridPlan(epochs, [0.0, 0.5, 1.0], [("main", "mychar", 1), ("flexibility", "mychar, blue theme", 1)])
    cells = plan.cells()
    blue_base = tinted(0, 0, 255)
    images = {
        # main layer: the baseline knows nothing of the red character; the LoRA makes it red.
        (0, 0.0): blue_base, (0, 0.5): tinted(220), (0, 1.0): tinted(255),
        # flexibility layer: asks for blue; the LoRA keeps it at 0.5, at 1 it turns everything red.
        (1, 0.0): blue_base, (1, 0.5): tinted(0, 0, 250), (1, 1.0): tinted(255),
    }
    shared = {key: image for key, image in images.items()}
    cell_images = [shared[(c.layer, c.weight)] for c in cells]
    cell_images[-1] = Image.new("RGB", (64, 64))  # epoch 2, weight 1, flexibility: a black (NaN) image
    predictions = tagger.predict(cell_images)
    scores = score_cells(cells, cell_images, predictions, core_tags=["red theme", "solo"],
                         requested_tags={1: ["blue theme", "^_^"]})
    assert len(scores) == len(cells)
    at = {(s.layer, s.epoch, s.weight): s for s in scores}
    main = [at[(0, 1, w)] for w in (0.0, 0.5, 1.0)]
    assert [s.likeness for s in main] == [0.0, 0.5, 1.0]  # red theme at 220/255 red, solo only at full red
    assert main[1].missing_core == ("solo",) and main[2].missing_core == ()
    assert [s.flexibility for s in main] == [None] * 3  # the main prompt requested nothing
    flex = [at[(1, 1, w)] for w in (0.0, 0.5, 1.0)]
    assert [s.flexibility for s in flex] == [1.0, 1.0, 0.0]
    assert flex[2].missing_requested == ("blue theme", "^_^")
    assert all(s.overcooked == 0.0 and not s.broken for s in main + flex[:2])
    black = at[(1, 2, 1.0)]
    assert black.broken and black.problem == "black" and black.overcooked == 1.0 and black.merit == 0.0
    # Sorting: best first; the broken cell is the most overcooked.
    assert sort_scores(scores, "overcooked")[-1] is black
    assert sort_scores(scores, "likeness")[0].likeness == 1.0
    assert sort_scores(scores)[0].merit == max(s.merit for s in scores)
    assert black.to_dict()["merit"] == 0.0 and black.to_dict()["problem"] == "black"


def test_scores_without_predictions_or_a_baseline_column():
    epochs = [Epoch(1, "mychar-000001", "x")]
    plan = GridPlan(epochs, [0.5, 1.0], [("main", "mychar", 1)])
    base = astronaut(128)
    scores = score_cells(plan.cells(), [base, fried(base, 3)])
    assert [s.likeness for s in scores] == [None, None]
    assert scores[0].overcooked == 0.0 and scores[1].overcooked == 1.0  # against the lowest weight
    assert score_cells(plan.cells(), [None, base]) and len(score_cells(plan.cells(), [None, base])) == 1
    with pytest.raises(ValueError, match="one image and one prediction per cell"):
        score_cells(plan.cells(), [base])
    with pytest.raises(LoraMakerError, match="scores sort by merit, likeness, flexibility, overcooked, not 'beauty'"):
        sort_scores([Score(0, 0, 0, 1, 1.0, None, None, 0.0, 0.0, 1.0, False)], "beauty")
