"""Tag curation on real caption files: frequency, filters, merge/prune/activation, undo, atomicity."""

from __future__ import annotations

import pytest
from conftest import add_image

from lora_trainer_ext.dataset import curate
from lora_trainer_ext.dataset.captions import format_tag, join_tags, split_tags, tag_key
from lora_trainer_ext.dataset.history import History
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.project import Project


def captions(project):
    return {p.name: (Project.caption_path(p).read_text(encoding="utf-8") if Project.caption_path(p).exists() else None)
            for p in project.images()}


@pytest.fixture
def dataset(project):
    add_image(project, "a.png", "1girl, blue_eyes, smile, twintails")
    add_image(project, "b.png", "1girl, blue eyes, aqua hair, twintails, smile", seed=1)
    add_image(project, "c.png", "1boy, smile, hat", seed=2)
    add_image(project, "d.png", seed=3)  # no caption
    return project


def test_tag_spelling_rules():
    assert format_tag("blue_eyes") == "blue eyes"
    assert format_tag("^_^") == "^_^" and format_tag(">_<") == ">_<"
    assert format_tag("hatsune_miku_(append)") == r"hatsune miku \(append\)"
    assert format_tag(r"already \(escaped\)") == r"already \(escaped\)"
    assert format_tag("blue_eyes", underscores_to_spaces=False, escape_parentheses=False) == "blue_eyes"
    assert tag_key("Blue_Eyes") == tag_key("blue eyes") == "blue eyes"
    assert tag_key(r"miku \(append\)") == tag_key("miku_(append)")
    assert split_tags("a, b,\n c ,, ") == ["a", "b", "c"]
    assert join_tags(["a", "b"]) == "a, b"


def test_frequency_counts_each_image_once_and_merges_spellings(dataset):
    table = dict(curate.tag_frequency(curate.load_captions(dataset)))
    assert table["smile"] == 3
    assert table["1girl"] == 2
    assert table["blue_eyes"] == 2  # "blue_eyes" and "blue eyes" are one tag, shown as first spelled
    assert "blue eyes" not in table
    assert list(table)[0] == "smile"


def test_filter_and_or_exclude():
    tags = ["1girl", "smile", "hat"]
    assert curate.Filter(["1girl", "hat"]).matches(tags)
    assert not curate.Filter(["1girl", "twintails"]).matches(tags)
    assert curate.Filter(["1girl", "twintails"], match_all=False).matches(tags)
    assert not curate.Filter(exclude=["Hat"]).matches(tags)
    assert curate.Filter().matches([])


def test_replace_merges_in_place_and_parse_errors():
    assert curate.replace(["a", "blue eyes", "b", "aqua eyes"], ["blue eyes", "aqua eyes"], ["eyes"]) == ["a", "eyes", "b"]
    assert curate.replace(["a", "b"], ["x"], ["y"]) == ["a", "b"]
    assert curate.parse_replace("old1, old2 => new") == (["old1", "old2"], ["new"])
    assert curate.parse_replace("old =>") == (["old"], [])
    with pytest.raises(LoraMakerError, match="=>"):
        curate.parse_replace("old new")


def test_activation_prune_merge_as_one_undoable_edit(dataset):
    before = captions(dataset)
    edits = curate.Edits(remove=["twintails"], replace=[(["blue eyes", "aqua hair"], ["mychar colours"])],
                         activation=["mychar"])
    changed = curate.edit_tags(dataset, edits, curate.Filter(["1girl"]))
    assert changed == 2
    after = captions(dataset)
    assert after["a.png"] == "mychar, 1girl, mychar colours, smile"
    assert after["b.png"] == "mychar, 1girl, mychar colours, smile"
    assert after["c.png"] == before["c.png"]  # filtered out: untouched, byte for byte
    assert after["d.png"] is None
    assert dataset.settings()["dataset"] == {"activation_tags": ["mychar"], "keep_tokens": 1}

    undone = History(dataset).undo()
    assert undone is not None and len(undone.changes) == 3  # two captions and settings.json
    assert captions(dataset) == before
    assert "dataset" not in dataset.settings()
    assert History(dataset).undo() is None


def test_sort_keeps_activation_first_and_dedupe(dataset):
    curate.edit_tags(dataset, curate.Edits(activation=["zzz tag"]))
    curate.edit_tags(dataset, curate.Edits(sort=True, dedupe=True, append=["smile"]))
    assert captions(dataset)["b.png"] == "zzz tag, 1girl, aqua hair, blue eyes, smile, twintails"
    assert captions(dataset)["d.png"] == "zzz tag, smile"
    assert [e.description for e in History(dataset).edits()] == ["activation zzz tag", "add smile; dedupe; sort"]


def test_pruning_the_activation_tag_forgets_it(dataset):
    curate.edit_tags(dataset, curate.Edits(activation=["mychar", "mychar outfit"]))
    assert dataset.settings()["dataset"]["keep_tokens"] == 2
    curate.edit_tags(dataset, curate.Edits(remove=["mychar outfit"]))
    assert dataset.settings()["dataset"] == {"activation_tags": ["mychar"], "keep_tokens": 1}
    assert captions(dataset)["c.png"].startswith("mychar, 1boy")


def test_per_image_edit_and_undo(dataset):
    assert curate.set_caption(dataset, "c.png", "  1boy, hat  ")
    assert captions(dataset)["c.png"] == "1boy, hat"
    assert not curate.set_caption(dataset, "c.png", "1boy, hat")  # unchanged: no history entry
    with pytest.raises(LoraMakerError, match="no image"):
        curate.set_caption(dataset, "../../etc/passwd", "x")
    History(dataset).undo()
    assert captions(dataset)["c.png"] == "1boy, smile, hat"


def test_undo_refuses_when_a_file_changed_since(dataset):
    curate.edit_tags(dataset, curate.Edits(remove=["smile"]))
    Project.caption_path(dataset.dataset_dir / "a.png").write_text("edited by hand", encoding="utf-8")
    with pytest.raises(LoraMakerError, match="changed after"):
        History(dataset).undo()
    # nothing was reverted, the edit is still in the history
    assert "smile" not in captions(dataset)["b.png"]
    assert len(History(dataset).edits()) == 1


def test_undo_of_an_edit_cut_short(dataset):
    """An interrupted edit (log written, not every file reached) still undoes cleanly."""
    before = captions(dataset)
    with History(dataset).begin("partial") as edit:
        edit.set(Project.caption_path(dataset.dataset_dir / "a.png"), "x")
        edit.set(Project.caption_path(dataset.dataset_dir / "b.png"), "y")
    Project.caption_path(dataset.dataset_dir / "b.png").write_text(before["b.png"], encoding="utf-8")  # as if never reached
    with open(edit.path, "a", encoding="utf-8") as log:
        log.write('{"file": "dataset/c.t')  # torn last line
    History(dataset).undo()
    assert captions(dataset) == before


def test_a_failed_write_leaves_the_old_file_whole(dataset, monkeypatch):
    from lora_trainer_ext import files

    target = Project.caption_path(dataset.dataset_dir / "a.png")
    before = target.read_text(encoding="utf-8")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        files.write_text(target, "half")
    assert target.read_text(encoding="utf-8") == before
    assert [p.name for p in dataset.path.rglob("*.tmp")] == []


def test_non_utf8_caption_is_a_clear_error(dataset):
    Project.caption_path(dataset.dataset_dir / "c.png").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LoraMakerError, match="not UTF-8"):
        curate.load_captions(dataset)
