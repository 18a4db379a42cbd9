"""The grid planner on real LoRA files and real projects: which epochs, weights, prompts and seeds a
grid renders, its cells in order, its checks, and the default prompts built from a curated dataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import add_image
from safetensors.numpy import save_file

from lora_trainer_ext.dataset import curate
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.grids.plan import (
    DEFAULT_WEIGHTS,
    Cell,
    Epoch,
    GridPlan,
    RenderSettings,
    core_tags,
    default_prompts,
    format_weight,
    is_trait,
    make_plan,
    parse_ints,
    parse_weights,
    prompt_layers,
    saved_epochs,
    select_epochs,
    weight_label,
)


def write_lora(folder, stem, mtime, **meta) -> None:
    path = folder / f"{stem}.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float16)}, str(path),
              metadata={f"ss_{k}": str(v) for k, v in meta.items()})
    os.utime(path, (mtime, mtime))


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    run = {"output_name": "mychar", "session_id": 111}
    write_lora(folder, "mychar-000010", 1000, output_name="mychar", session_id=99, epoch=10)  # an older, longer run
    for i, epoch in enumerate((2, 4, 6)):
        write_lora(folder, f"mychar-{epoch:06d}", 2000 + i, epoch=epoch, **run)
    write_lora(folder, "mychar", 2010, epoch=8, **run)  # the final file: epoch 8
    write_lora(folder, "mychar-step00000123", 2005, epoch=7, **run)  # "stop and save": not an epoch
    write_lora(folder, "mychar-2", 3000, output_name="mychar-2", session_id=5, epoch=3)  # another project
    write_lora(folder, "other-000002", 3000, output_name="other", session_id=6, epoch=2)
    return folder


def plan_of(epochs, weights=(0.0, 0.5, 1.0), layers=(("main", "mychar, 1girl", 1234),)) -> GridPlan:
    return GridPlan(list(epochs), list(weights), list(layers), "lowres", RenderSettings())


# -- saved epochs -----------------------------------------------------------------------------------

def test_saved_epochs_of_the_latest_run_with_the_final_file_last(lora_dir):
    epochs = saved_epochs(lora_dir, "mychar")
    assert [(e.number, e.lora) for e in epochs] == [
        (2, "mychar-000002"), (4, "mychar-000004"), (6, "mychar-000006"), (8, "mychar")]
    assert epochs[-1].path == lora_dir / "mychar.safetensors"
    assert [e.number for e in saved_epochs(lora_dir, "mychar-2")] == [3]


def test_final_file_without_metadata_follows_the_last_epoch(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    write_lora(folder, "mychar-000003", 100)
    write_lora(folder, "mychar-000006", 101)
    (folder / "mychar.safetensors").write_bytes(b"\x00" * 4)  # not readable as safetensors: no metadata
    assert [(e.number, e.lora) for e in saved_epochs(folder, "mychar")] == [
        (3, "mychar-000003"), (6, "mychar-000006"), (7, "mychar")]


def test_no_saved_epochs(tmp_path):
    assert saved_epochs(tmp_path / "missing", "mychar") == []
    (tmp_path / "empty").mkdir()
    assert saved_epochs(tmp_path / "empty", "mychar") == []
    with pytest.raises(LoraMakerError, match="no LoRA named mychar in .*: train first"):
        make_plan(tmp_path / "empty", "mychar", [("main", "mychar")])


def epochs_numbered(*numbers):
    return [Epoch(n, f"mychar-{n:06d}", f"mychar-{n:06d}.safetensors") for n in numbers]


def test_select_epochs():
    epochs = epochs_numbered(1, 2, 3, 4, 5, 6, 7)
    numbers = lambda selected: [e.number for e in selected]  # noqa: E731
    assert numbers(select_epochs(epochs, "all")) == [1, 2, 3, 4, 5, 6, 7]
    assert numbers(select_epochs(epochs, "every", 2)) == [2, 4, 6, 7]  # the last is always kept
    assert numbers(select_epochs(epochs, "every", 3)) == [3, 6, 7]
    assert numbers(select_epochs(epochs, "every", 7)) == [7]
    assert numbers(select_epochs(epochs, "every", 10)) == [7]
    assert numbers(select_epochs(epochs, "every", 1)) == [1, 2, 3, 4, 5, 6, 7]
    assert numbers(select_epochs(epochs, "chosen", chosen=[6, 2, 6])) == [2, 6]
    with pytest.raises(LoraMakerError, match=r"epoch 8 was not saved \(saved epochs: 1, 2, 3, 4, 5, 6, 7\)"):
        select_epochs(epochs, "chosen", chosen=[2, 8])
    with pytest.raises(LoraMakerError, match="choose at least one epoch"):
        select_epochs(epochs, "chosen", chosen=[])
    assert numbers(select_epochs(epochs, "every", 3.0)) == [3, 6, 7]  # what a number field gives
    for k in (0, 1.5):
        with pytest.raises(LoraMakerError, match="a whole k of 1 or more"):
            select_epochs(epochs, "every", k)
    with pytest.raises(LoraMakerError, match="unknown epoch selection 'some'"):
        select_epochs(epochs, "some")


# -- cells ------------------------------------------------------------------------------------------

def test_cell_prompts_and_lora_tags():
    epoch = Epoch(4, "mychar-000004", "x")
    cell = Cell(0, 3, 0, epoch, 0.8, "mychar, 1girl", "lowres", 1234)
    assert cell.lora_tag() == "<lora:mychar-000004:0.8>"
    assert cell.full_prompt() == "mychar, 1girl, <lora:mychar-000004:0.8>"
    baseline = Cell(0, 0, 0, epoch, 0.0, "mychar, 1girl", "lowres", 1234)
    assert baseline.lora_tag() == "" and baseline.full_prompt() == "mychar, 1girl"
    assert format_weight(1.0) == "1" and format_weight(0.75) == "0.75" and format_weight(1.25) == "1.25"
    assert weight_label(0.0) == "no LoRA" and weight_label(0.5) == "0.5"


def test_cells_are_layer_then_epoch_then_weight_and_the_baseline_renders_once_per_layer():
    plan = GridPlan(epochs_numbered(2, 4, 6), [0.0, 0.5, 1.0],
                    prompt_layers([("main", "mychar, 1girl"), ("flexibility", "mychar, beach")], [1, 2]), "lowres")
    cells = plan.cells()
    assert plan.shape == (4, 3, 3) and len(cells) == 36
    assert [(c.layer, c.row, c.col) for c in cells[:4]] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert [c.epoch.number for c in cells[:9]] == [2, 2, 2, 4, 4, 4, 6, 6, 6]
    assert [c.weight for c in cells[:3]] == [0.0, 0.5, 1.0]
    assert [layer[0] for layer in plan.layers] == ["main, seed 1", "main, seed 2", "flexibility, seed 1", "flexibility, seed 2"]
    assert cells[0].seed == 1 and cells[9].seed == 2 and cells[18].prompt == "mychar, beach"
    baselines = [c for c in cells if c.layer == 0 and c.weight == 0]
    assert len({c.key() for c in baselines}) == 1  # identical for every epoch
    assert plan.render_count() == 4 * (3 * 2 + 1)
    assert plan.row_labels() == ["epoch 2", "epoch 4", "epoch 6"]
    assert plan.col_labels() == ["no LoRA", "0.5", "1"]
    assert all(c.negative == "lowres" for c in cells)
    assert prompt_layers([("main", "p")], [7]) == [("main", "p", 7)]


def test_plan_checks_say_what_to_fix():
    ok = plan_of(epochs_numbered(2))
    ok.check()
    cases = [
        (plan_of([]), "no saved epochs to compare: train first"),
        (plan_of(epochs_numbered(2), weights=[0.0, 2.5]), "LoRA weights must be between 0 and 2, got 2.5"),
        (plan_of(epochs_numbered(2), weights=[-0.5]), "between 0 and 2, got -0.5"),
        (plan_of(epochs_numbered(2), weights=[]), "at least one weight"),
        (plan_of(epochs_numbered(2), layers=[("main", "  ", 1)]), "the prompt 'main' is empty"),
        (plan_of(epochs_numbered(2), layers=[]), "at least one prompt"),
        (plan_of(epochs_numbered(2), layers=[("main", "x", -1)]), "seeds are fixed"),
    ]
    for plan, message in cases:
        with pytest.raises(LoraMakerError, match=message):
            plan.check()
    for settings, message in [(RenderSettings(steps=0), "steps must be between 1 and 150"),
                              (RenderSettings(cfg_scale=0.5), "CFG scale"),
                              (RenderSettings(width=500), "width must be a multiple of 8"),
                              (RenderSettings(height=4096), "height must be a multiple of 8"),
                              (RenderSettings(sampler=" "), "pick a sampler")]:
        with pytest.raises(LoraMakerError, match=message):
            GridPlan(epochs_numbered(2), [1.0], [("main", "x", 1)], "", settings).check()


def test_defaults_are_the_webui_txt2img_defaults():
    s = RenderSettings()
    assert (s.sampler, s.scheduler, s.steps, s.cfg_scale, s.width, s.height) == ("DPM++ 2M", "Automatic", 20, 7.0, 512, 512)
    assert DEFAULT_WEIGHTS == (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_make_plan_from_files(lora_dir):
    plan = make_plan(lora_dir, "mychar", [("main", "mychar, 1girl"), ("flexibility", "mychar, beach")],
                     mode="every", k=2, weights=[1.0, 0.0, 0.5, 0.5], negative="lowres")
    assert [e.number for e in plan.epochs] == [4, 8]
    assert plan.weights == [0.0, 0.5, 1.0]
    assert plan.layers == [("main", "mychar, 1girl", 1234), ("flexibility", "mychar, beach", 1234)]
    with pytest.raises(LoraMakerError, match="the prompt 'flexibility' is empty"):
        make_plan(lora_dir, "mychar", [("main", "x"), ("flexibility", "")])
    # the negative prompt starts from the render settings' (the WebUI's txt2img default there)
    settings = RenderSettings(negative="lowres, bad hands")
    assert make_plan(lora_dir, "mychar", [("main", "x")], settings=settings).negative == "lowres, bad hands"
    assert make_plan(lora_dir, "mychar", [("main", "x")], settings=settings, negative="").negative == ""
    assert plan.negative == "lowres" and {c.negative for c in plan.cells()} == {"lowres"}


def test_plan_round_trips_through_json(lora_dir):
    plan = make_plan(lora_dir, "mychar", [("main", "mychar, 1girl")], seeds=[5, 6],
                     settings=RenderSettings(steps=8, width=256))
    again = GridPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.cells() == plan.cells()
    with pytest.raises(LoraMakerError, match="not a grid plan"):
        GridPlan.from_dict({"epochs": [{"number": "x"}]})


def test_parsing_typed_numbers():
    assert parse_weights("1, 0 0.5,0.5") == [0.0, 0.5, 1.0]
    assert parse_ints("6, 2 6", "epochs") == [6, 2]
    with pytest.raises(LoraMakerError, match="weights are numbers"):
        parse_weights("0.5, strong")
    with pytest.raises(LoraMakerError, match="between 0 and 2, got 3.0"):
        parse_weights("0, 3")
    with pytest.raises(LoraMakerError, match="type the weights"):
        parse_weights(" , ")
    with pytest.raises(LoraMakerError, match="seeds are whole numbers"):
        parse_ints("1.5", "seeds")


# -- default prompts --------------------------------------------------------------------------------

@pytest.fixture
def curated(project):
    captions = [
        "1girl, blue hair, long hair, red eyes, smile, school uniform, outdoors",
        "1girl, blue hair, long hair, red eyes, smile, school uniform, sitting",
        "1girl, blue hair, long hair, red eyes, looking at viewer, beach, closed eyes",
        "1girl, blue hair, long hair, smile, upper body, highres",
    ]
    for i, caption in enumerate(captions):
        add_image(project, f"{i}.png", caption, seed=i)
    return project


def test_default_prompts_after_pruning_traits_into_the_activation_tag(curated):
    curate.edit_tags(curated, curate.Edits(remove=["blue hair", "long hair"], activation=["mychar"]))
    main, flexibility, requested, core = default_prompts(curated)
    # The activation tag first, then the tags on at least a quarter of the images, meta tags left out.
    assert main.startswith("mychar, 1girl, red eyes, smile, school uniform, ")
    assert "highres" not in main and "blue hair" not in main
    # A place, an outfit and an action the dataset lacks (it has a beach and a school uniform).
    assert requested == ["snow", "kimono", "running"]
    assert flexibility == "mychar, 1girl, snow, kimono, running"
    assert core == ["blue hair", "long hair"]  # what was pruned, from the history


def test_core_tags_recorded_in_the_settings_come_first(curated):
    curated.update_settings(dataset={"core_tags": ["aqua hair", "twintails"]})
    assert core_tags(curated) == ["aqua hair", "twintails"]


def test_core_tags_without_pruning_are_the_frequent_traits(curated):
    # Nothing pruned: traits on at least half the images ("closed eyes" is an expression, not a trait).
    assert core_tags(curated) == ["blue hair", "long hair", "red eyes"]


def test_pruned_traits_count_the_captions_that_carried_them(curated):
    curate.edit_tags(curated, curate.Edits(remove=["red eyes"]), curate.Filter(["sitting"]))
    assert core_tags(curated) == ["blue hair", "long hair", "red eyes"]  # still on 2 captions: not pruned
    curate.edit_tags(curated, curate.Edits(remove=["red eyes"]))
    assert core_tags(curated) == ["red eyes"]  # pruned from the 3 captions that carried it
    curate.edit_tags(curated, curate.Edits(append=["heterochromia"]), curate.Filter(["sitting"]))
    curate.edit_tags(curated, curate.Edits(remove=["heterochromia"]))
    assert core_tags(curated) == ["red eyes"]  # a trait that one caption carried is no core tag


def test_traits():
    for tag in ("blue hair", "long_hair", "red eyes", "hair between eyes", "animal ears", "cat tail", "ahoge",
                "large breasts", "dark skin", "twintails", "side ponytail", "mole under eye", "hair over one eye"):
        assert is_trait(tag), tag
    for tag in ("closed eyes", "looking at viewer", "hand on own chest", "school uniform", "hair ornament",
                "holding tail", "smile", "bare chest", "1girl"):
        assert not is_trait(tag), tag


def test_default_prompts_of_an_uncaptioned_project(project):
    add_image(project, "a.png")
    main, flexibility, requested, core = default_prompts(project)
    assert main == "" and core == []
    assert requested == ["beach", "school uniform", "running"] and flexibility == "beach, school uniform, running"
    plan = plan_of(epochs_numbered(1), layers=[("main", main, 1)])
    with pytest.raises(LoraMakerError, match="the prompt 'main' is empty: type a prompt"):
        plan.check()
