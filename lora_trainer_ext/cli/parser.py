"""The command line's arguments. The command names and options are a contract other tools script
against: extend, don't break."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..paths import default_model_cache, default_projects_root

EXAMPLES = """\
a dataset from a tag query, step by step:
  python -m lora_trainer_ext scrape mychar --booru safebooru --tags "hatsune_miku solo -comic" --limit 60
  python -m lora_trainer_ext dedupe mychar            # list duplicate groups
  python -m lora_trainer_ext dedupe mychar --apply    # move the duplicates to mychar/trash/
  python -m lora_trainer_ext tag mychar               # WD tagger (downloads the model once)
  python -m lora_trainer_ext tags mychar --top 30     # the most frequent tags
  python -m lora_trainer_ext tags mychar --activation "mychar" --remove "aqua hair, twintails"
  python -m lora_trainer_ext tags mychar --undo       # take back the last caption edit
  python -m lora_trainer_ext report mychar            # anything that would trip up training

projects live in --root (default: $LORA_MAKER_ROOT, the WebUI setting, <webui>/lora-maker or ~/lora-maker)
"""


def _csv(value: str) -> list[str]:
    from ..dataset.captions import split_tags

    return split_tags(value)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="python -m lora_trainer_ext",
        description="LoRA Maker: build a LoRA training dataset from a booru tag query, headless.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"LoRA Maker {__version__}")
    parser.add_argument("--root", type=Path, default=None, metavar="DIR", help=f"projects folder (default: {default_projects_root()})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, **kw)
        sub.add_argument("project", metavar="PROJECT", help="project name (a folder under --root)")
        return sub

    _dataset_commands(command)
    _training_commands(command)
    _app_commands(commands)
    return parser


def _dataset_commands(command) -> None:
    from ..dataset.boorus import BOORUS
    from ..dataset.dedupe import DEFAULT_THRESHOLD, MAX_THRESHOLD
    from ..dataset.tagger import DEFAULT_MODEL, EXISTING_MODES, TagOptions

    p = command("scrape", "download images (and optionally their tags) from a booru into the project")
    p.add_argument("--tags", required=True, help='booru tag query, e.g. "1girl solo -comic rating:general score:>=10"')
    p.add_argument("--booru", choices=BOORUS, default="gelbooru", help="which booru (default: gelbooru)")
    p.add_argument("--api-url", metavar="URL", help="base URL of the booru (default: its public site)")
    p.add_argument("--api-key", metavar="KEY", help="API key (Gelbooru, Danbooru); or set LORA_MAKER_<BOORU>_API_KEY")
    p.add_argument("--user-id", metavar="ID", help="user id (Gelbooru) or login (Danbooru); or set LORA_MAKER_<BOORU>_USER_ID")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images from this query in the dataset, counting those already there (default: all)")
    p.add_argument("--save-tags", action="store_true", help="keep each post's own tags as its starting caption")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="parallel downloads (default: 4)")
    p.add_argument("--yes", "-y", action="store_true", help="download without asking after the count")

    p = command("dedupe", "find exact and near-duplicate images; --apply moves them to the trash")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BITS",
                   help=f"perceptual-hash bits that may differ, 0 (exact) to {MAX_THRESHOLD} (default: {DEFAULT_THRESHOLD})")
    p.add_argument("--apply", action="store_true", help="move every duplicate but its group's keeper to the trash")

    defaults = TagOptions()
    p = command("tag", "caption the images with a WD tagger (onnxruntime)")
    p.add_argument("--tagger", default=DEFAULT_MODEL, metavar="REPO_OR_DIR", help=f"Hugging Face repo id or local folder with model.onnx + selected_tags.csv (default: {DEFAULT_MODEL})")
    p.add_argument("--threshold", type=float, default=defaults.threshold, metavar="X", help=f"general tag confidence (default: {defaults.threshold})")
    p.add_argument("--character-threshold", type=float, default=defaults.character_threshold, metavar="X", help=f"character tag confidence (default: {defaults.character_threshold})")
    p.add_argument("--existing", choices=EXISTING_MODES, default=defaults.existing, help=f"what to do with captions already there (default: {defaults.existing})")
    p.add_argument("--ratings", action="store_true", help="also write the rating tag (general, sensitive, ...)")
    p.add_argument("--blacklist", type=_csv, default=None, metavar="TAGS", help="comma-separated tags never written (default: meta tags)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N", help=f"images per inference batch (default: {defaults.batch_size})")
    p.add_argument("--model-cache", type=Path, default=None, metavar="DIR", help=f"where models are downloaded (default: {default_model_cache()})")

    p = command("caption", "caption the images in natural language with BLIP (for photos)")
    p.add_argument("--model", default=None, metavar="REPO_OR_DIR", help="BLIP model: Hugging Face repo id or local folder")
    p.add_argument("--existing", choices=EXISTING_MODES, default="skip", help="what to do with captions already there (default: skip)")
    p.add_argument("--model-cache", type=Path, default=None, metavar="DIR", help=f"where models are downloaded (default: {default_model_cache()})")

    p = command("tags", "show the tag frequency table, search captions by tag, and edit them (every edit is undoable); "
                        "--include/--exclude select the images that are counted, listed and edited")
    p.add_argument("--top", type=int, default=None, metavar="N", help="show the N most frequent tags (default: 50 when not editing)")
    p.add_argument("--activation", type=_csv, default=[], metavar="TAGS", help="activation tag(s): put first in every caption; keep_tokens is remembered for training")
    p.add_argument("--remove", type=_csv, default=[], metavar="TAGS", help='prune tags, e.g. "aqua hair, twintails"')
    p.add_argument("--replace", action="append", default=[], metavar="SPEC", help='merge tags: "old1, old2 => new" (repeatable; empty right side removes)')
    p.add_argument("--add", type=_csv, default=[], metavar="TAGS", help="append tags")
    p.add_argument("--dedupe", action="store_true", help="drop repeated tags inside each caption")
    p.add_argument("--sort", action="store_true", help="sort tags alphabetically (activation tags stay first)")
    p.add_argument("--include", type=_csv, default=[], metavar="TAGS", help="only images that carry these tags")
    p.add_argument("--exclude", type=_csv, default=[], metavar="TAGS", help="only images that carry none of these tags")
    p.add_argument("--any", action="store_true", help="--include matches images with any (not all) of its tags")
    p.add_argument("--list", action="store_true", help="list the matching images with their captions")
    p.add_argument("--set", nargs=2, metavar=("IMAGE", "CAPTION"), help="replace one image's caption")
    p.add_argument("--undo", action="store_true", help="undo the last caption edit")
    p.add_argument("--history", action="store_true", help="list the caption edits that can be undone")

    command("report", "check the dataset: missing captions, corrupt files, resolution and aspect spread")

    p = command("trash", "list the trash, or restore images from it")
    p.add_argument("--restore", nargs="*", metavar="NAME", help="restore these trashed files (all when no name given)")


def _training_commands(command) -> None:
    def model_options(p, required: bool) -> None:
        p.add_argument("--checkpoint", type=Path, required=required, metavar="FILE",
                       help="the model: an SD1, SD2 or SDXL .safetensors/.ckpt" + ("" if required else
                            " (default: none, the estimate is for SD1)"))
        p.add_argument("--model-config", type=Path, metavar="YAML", help="its ldm config (default: the .yaml beside it, else by model type)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                       help="a training setting, e.g. --set epochs=4 --set network=locon --set dim=8 (repeatable; "
                            "see the project's settings.json 'train' section for every name)")

    p = command("train", "train a LoRA (or LoCon) on a checkpoint file with the project's dataset")
    model_options(p, required=True)
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="where the LoRA files go (default: the WebUI's models/Lora/PROJECT, or PROJECT/output)")
    p.add_argument("--resume", action="store_true", help="continue the last stopped or interrupted run")
    p.add_argument("--restart", action="store_true", help="start over, discarding a stopped run")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


    p = command("plan", "the run's step arithmetic and VRAM estimate, as the tab and the API show them")
    model_options(p, required=False)


def _app_commands(commands) -> None:
    ui = commands.add_parser("ui", help="the LoRA Maker tab in a browser without the WebUI, training on --checkpoint",
                             description="serve the LoRA Maker tab and its HTTP API (/lora-maker/v1/) without the WebUI")
    ui.add_argument("--checkpoint", type=Path, metavar="FILE", help="the model to train on (SD1, SD2 or SDXL); without it only the dataset steps work")
    ui.add_argument("--lora-dir", type=Path, metavar="DIR", help="where the LoRA files go (default: PROJECT/output under --root)")
    ui.add_argument("--model-cache", type=Path, default=None, metavar="DIR", help=f"where tagger models are downloaded (default: {default_model_cache()})")
    ui.add_argument("--port", type=int, default=7870, help="port (default: 7870)")
    ui.add_argument("--listen", action="store_true", help="serve on every network interface (needs --auth), not just this machine")
    ui.add_argument("--auth", metavar="USER:PASS[,USER:PASS]", help="require these logins for the page and the API")
    ui.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")

    bench = commands.add_parser("bench", help="benchmarks (print a table)", description="benchmarks (print a table)")
    bench.add_argument("what", choices=["dedupe", "train", "grid"],
                       help="dedupe: hashing images/s and grouping time at 1k/10k/100k; train: seconds per training "
                            "step on a random-weight model against the bare forward+backward (the floor); grid: "
                            "seconds per grid image rendered headless against sampling + decoding alone")
    bench.add_argument("--images", type=int, default=200, metavar="N", help="dedupe: images generated for the hashing benchmark")
    bench.add_argument("--model", action="append", choices=["tiny", "tiny-sdxl", "small", "sd15", "sdxl"], default=None,
                       help="train, grid: model shape, repeatable (default: train small and tiny-sdxl, grid tiny and "
                            "small on the CPU; sd15 and sdxl on a GPU); SDXL rows come with and without cached "
                            "text-encoder outputs")
    bench.add_argument("--network", action="append", choices=["lora", "locon"], default=None,
                       help="train: network, repeatable (default: both)")
    bench.add_argument("--batch", type=int, default=4, metavar="N", help="train: batch size (default: 4)")
    bench.add_argument("--steps", type=int, default=None, metavar="N",
                       help="train: timed steps per run after 2 warm-up steps, each followed by a floor step "
                            "(default: 4 on the CPU, 10 on a GPU); grid: sampling steps (default: 20)")
    bench.add_argument("--rounds", type=int, default=3, metavar="N",
                       help="train: runs of train() per row (default: 3); the ratio is the median of the runs', "
                            "with their range")
    bench.add_argument("--resolution", type=int, default=None, metavar="PX",
                       help="train, grid: image side (default: the model's: tiny 64, small 256, sd15 512, sdxl 1024)")
    bench.add_argument("--device", default=None, help="train, grid: cuda, cpu, ... (default: cuda when available)")
    bench.add_argument("--sampler", choices=["DPM++ 2M", "Euler"], default="DPM++ 2M",
                       help="grid: the sampler (default: DPM++ 2M, the WebUI's default)")
