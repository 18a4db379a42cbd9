"""Captions through the shared writer: a BLIP model (tiny, random weights, built here with transformers
and a hand-made WordPiece vocabulary) loaded from a folder and from a loopback hub, and any other
captioner plugged into the same protocol."""

from __future__ import annotations

import sys

import pytest
import tiny_onnx
from PIL import Image

from lora_trainer_ext.dataset import hub
from lora_trainer_ext.dataset.captioner import BLIP_FILES, caption_project, load_blip, merge_caption
from lora_trainer_ext.dataset.captions import read_caption
from lora_trainer_ext.dataset.history import History
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.project import Project

WORDS = "a photo of the cat dog man woman red blue sitting on with in and beach tree house car standing".split()


def build_tiny_blip(folder, safetensors: bool = False):
    """A BLIP captioning model with tiny dimensions and its processor (BERT WordPiece tokenizer)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True)
    vocab = folder / "vocab-src.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")  # BLIP's decoder starts from [DEC]
    vocab.unlink()
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(str(folder), safe_serialization=safetensors)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="module")
def blip(blip_dir):
    return load_blip(str(blip_dir))


@pytest.fixture
def project(tmp_path):
    project = Project.open(tmp_path / "projects", "photos", create=True)
    for name, colour in (("beach.png", (250, 220, 120)), ("forest.jpg", (30, 140, 40))):
        Image.new("RGB", (80, 60), colour).save(project.dataset_dir / name)
    return project


def captions(project) -> dict[str, str | None]:
    return {image.name: read_caption(image) for image in project.images()}


def test_blip_from_a_folder_captions_into_the_txt_files(blip, project):
    images = [Image.open(p).convert("RGB") for p in project.images()]
    expected = blip.caption(images)
    assert len(expected) == 2 and all(isinstance(text, str) and text for text in expected)
    assert set(" ".join(expected).split()) <= set(WORDS)  # decoded by the tokenizer, special tokens dropped
    project.update_settings(dataset={"activation_tags": ["ohwx man"]})
    report = caption_project(project, blip)
    assert captions(project) == {name: f"ohwx man, {text}" for name, text in zip(["beach.png", "forest.jpg"], expected)}
    assert (report.captioned, report.changed, report.provider) == (2, 2, "torch cpu")
    assert [e.description for e in History(project).edits()] == [f"caption with {blip.name}"]


def test_blip_from_the_hub(tmp_path, blip_dir):
    cache = tmp_path / "cache"
    with tiny_onnx.serve_hub() as server:
        server.repos["someone/tiny-blip"] = tiny_onnx.hub_files(blip_dir)  # pytorch_model.bin, no safetensors
        captioner = load_blip("someone/tiny-blip", cache_dir=cache, endpoint=server.url)
        folder = hub.repo_dir(cache, "someone/tiny-blip")
        assert set(BLIP_FILES) | {"pytorch_model.bin"} <= {p.name for p in folder.iterdir()}
        assert "model.safetensors" in " ".join(path for path, _, _ in server.requests)  # tried first
        assert captioner.caption([Image.new("RGB", (40, 40), "red")])[0]
        asked = len(server.requests)
        load_blip("someone/tiny-blip", cache_dir=cache, endpoint=server.url)
        assert len(server.requests) == asked  # complete in the cache: no network needed


def test_blip_safetensors_from_the_hub(tmp_path):
    source = build_tiny_blip(tmp_path / "src", safetensors=True)
    with tiny_onnx.serve_hub() as server:
        server.repos["someone/blip-st"] = tiny_onnx.hub_files(source)
        captioner = load_blip("someone/blip-st", cache_dir=tmp_path / "cache", endpoint=server.url)
        assert (hub.repo_dir(tmp_path / "cache", "someone/blip-st") / "model.safetensors").is_file()
        assert not any(path.endswith("pytorch_model.bin") for path, _, _ in server.requests)
        assert isinstance(captioner.caption([Image.new("L", (40, 40), 128)])[0], str)


def test_a_repo_without_weights_is_explained(tmp_path, blip_dir):
    with tiny_onnx.serve_hub() as server:
        files = tiny_onnx.hub_files(blip_dir)
        del files["pytorch_model.bin"]
        server.repos["someone/no-weights"] = files
        with pytest.raises(LoraMakerError, match="model.safetensors, pytorch_model.bin"):
            load_blip("someone/no-weights", cache_dir=tmp_path, endpoint=server.url)


def test_no_transformers_says_what_to_do(monkeypatch, blip_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import` sees when it is not installed
    with pytest.raises(LoraMakerError, match="WebUI"):
        load_blip(str(blip_dir))


class ColourNamer:
    """Any captioner plugs into the writer: this one names the dominant colour."""

    name = "colour namer"
    provider = "cpu"
    image_size = None

    def caption(self, images):
        pixels = [img.convert("RGB").getpixel((0, 0)) for img in images]
        return ["a green photo" if g > r else "a yellow photo" for r, g, _ in pixels]


def test_the_writer_merges_and_skips_for_any_captioner(project):
    (project.dataset_dir / "forest.txt").write_text("trees, a green photo")
    (project.dataset_dir / "broken.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBP")
    report = caption_project(project, ColourNamer(), existing="skip")
    assert captions(project)["beach.png"] == "a yellow photo" and captions(project)["forest.jpg"] == "trees, a green photo"
    assert (report.captioned, report.skipped, [n for n, _ in report.unreadable]) == (1, 1, ["broken.webp"])
    caption_project(project, ColourNamer(), existing="prepend")
    assert captions(project)["forest.jpg"] == "a green photo, trees"
    History(project).undo()
    History(project).undo()
    assert captions(project) == {"beach.png": None, "broken.webp": None, "forest.jpg": "trees, a green photo"}


def test_merge_rules():
    assert merge_caption("a, b", "b, c", "append", []) == "a, b, c"
    assert merge_caption("a, b", "b, c", "prepend", ["x"]) == "x, b, c, a"
    assert merge_caption("a, b", "c", "overwrite", ["b"]) == "b, c"
    with pytest.raises(LoraMakerError, match="skip, append, prepend, overwrite"):
        merge_caption("a", "b", "merge", [])
