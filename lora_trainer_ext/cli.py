"""The headless command line: `python -m lora_trainer_ext [--root DIR] COMMAND PROJECT [options]`.

Each command is a thin layer over the same library calls the WebUI tab makes. Exit status 0 on
success; on failure a one-line reason on stderr and a non-zero status (1 error, 130 interrupted).
The command names and options are a contract other tools script against: extend, don't break."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import LoraMakerError
from .paths import default_model_cache, default_projects_root

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
    from .dataset.captions import split_tags

    return split_tags(value)


def build_parser() -> argparse.ArgumentParser:
    from .dataset.boorus import BOORUS
    from .dataset.dedupe import DEFAULT_THRESHOLD, MAX_THRESHOLD
    from .dataset.tagger import DEFAULT_MODEL, EXISTING_MODES, TagOptions

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

    p = command("train", "train a LoRA (or LoCon) on a checkpoint file with the project's dataset")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="FILE", help="the model: an SD1, SD2 or SDXL .safetensors/.ckpt")
    p.add_argument("--model-config", type=Path, metavar="YAML", help="its ldm config (default: the .yaml beside it, else by model type)")
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="where the LoRA files go (default: the WebUI's models/Lora/PROJECT, or PROJECT/output)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a training setting, e.g. --set epochs=4 --set network=locon --set dim=8 (repeatable; "
                        "see the project's settings.json 'train' section for every name)")
    p.add_argument("--resume", action="store_true", help="continue the last stopped or interrupted run")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")

    p = command("trash", "list the trash, or restore images from it")
    p.add_argument("--restore", nargs="*", metavar="NAME", help="restore these trashed files (all when no name given)")

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
    bench.add_argument("--model", action="append", choices=["tiny", "small", "sd15", "sdxl"], default=None,
                       help="train, grid: model shape, repeatable (default: train small, grid tiny and small on the "
                            "CPU; sd15 and sdxl on a GPU)")
    bench.add_argument("--network", action="append", choices=["lora", "locon"], default=None,
                       help="train: network, repeatable (default: both)")
    bench.add_argument("--batch", type=int, default=4, metavar="N", help="train: batch size (default: 4)")
    bench.add_argument("--steps", type=int, default=None, metavar="N",
                       help="train: timed steps after 2 warm-up steps (default: 8 on the CPU, 20 on a GPU); "
                            "grid: sampling steps (default: 20)")
    bench.add_argument("--resolution", type=int, default=None, metavar="PX",
                       help="train, grid: image side (default: the model's: tiny 64, small 256, sd15 512, sdxl 1024)")
    bench.add_argument("--device", default=None, help="train, grid: cuda, cpu, ... (default: cuda when available)")
    bench.add_argument("--sampler", choices=["DPM++ 2M", "Euler"], default="DPM++ 2M",
                       help="grid: the sampler (default: DPM++ 2M, the WebUI's default)")
    return parser


def _progress():
    from .progress import TqdmProgress

    return TqdmProgress()


def _say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def _confirm(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:  # nobody to answer (a script, a pipe)
        raise LoraMakerError("not downloading without confirmation: pass --yes to download non-interactively") from None


def cmd_scrape(args, project_of) -> None:
    from .dataset.boorus import make_client
    from .dataset.http import Http
    from .dataset.scrape import download, plan

    progress = _progress()
    # without --api-key/--user-id the client takes the stored ones (environment, WebUI settings)
    client = make_client(args.booru, api_url=args.api_url, api_key=args.api_key or "", user_id=args.user_id or "",
                         http=Http(should_stop=progress.should_stop))
    project = project_of(create=True)
    todo = plan(project, client, args.tags, limit=args.limit, progress=progress)
    _say(todo.preview())
    if not todo.posts:
        return
    if not args.yes and not _confirm(f"Download {len(todo.posts)} images into {project.dataset_dir}?"):
        _say("nothing downloaded")
        return
    result = download(project, todo, workers=args.workers, save_tags=args.save_tags, progress=progress)
    _say(*[f"rejected #{post_id}: {why}" for post_id, why in result.rejected],
         *[f"failed #{post_id}: {why}" for post_id, why in result.failed], result.summary())


def cmd_dedupe(args, project_of) -> None:
    from .dataset.dedupe import find_groups, scan, trash_duplicates

    project = project_of()
    infos = scan(project, _progress())
    groups = find_groups(infos, args.threshold)
    for group in groups:
        k = group.keeper
        _say(f"keep {k.name} ({k.width}x{k.height})")
        for dup in group.duplicates:
            _say(f"  {'exact copy' if dup.exact else f'{dup.distance:2d} bits'}  {dup.name}")
    unreadable = [i for i in infos if i.error]
    for info in unreadable:
        _say(f"unreadable: {info.name}: {info.error}")
    count = sum(len(g.duplicates) for g in groups)
    if not groups:
        _say(f"no duplicates among {len(infos)} images at threshold {args.threshold}")
    elif args.apply:
        moved = trash_duplicates(project, groups)
        _say(f"moved {moved} duplicates to {project.trash_dir} (restore with: trash {project.name} --restore)")
    else:
        _say(f"{count} duplicates in {len(groups)} groups; run again with --apply to move them to the trash")


def cmd_tag(args, project_of) -> None:
    from .dataset.tagger import TagOptions, load_tagger, tag_project

    project = project_of()
    options = TagOptions(threshold=args.threshold, character_threshold=args.character_threshold, existing=args.existing,
                         include_ratings=args.ratings, batch_size=args.batch_size)
    if args.blacklist is not None:
        options.blacklist = args.blacklist
    progress = _progress()
    tagger = load_tagger(args.tagger, cache_dir=args.model_cache, progress=progress)
    _say(tag_project(project, tagger, options, progress).summary())


def cmd_caption(args, project_of) -> None:
    from .dataset.captioner import caption_project, load_blip

    project = project_of()
    progress = _progress()
    captioner = load_blip(args.model, cache_dir=args.model_cache, progress=progress)
    _say(caption_project(project, captioner, existing=args.existing, progress=progress).summary())


def cmd_tags(args, project_of) -> None:
    from .dataset import curate
    from .dataset.history import History

    project = project_of()
    if args.undo:
        edit = History(project).undo()
        _say(f"undone: {edit.description} ({len(edit.changes)} files)" if edit else "nothing to undo")
        return
    if args.history:
        edits = History(project).edits()
        _say(*[f"{e.number:4d}  {e.time}  {e.description} ({len(e.changes)} files)" for e in edits] or ["no edits yet"])
        return
    if args.set:
        changed = curate.set_caption(project, *args.set)
        _say(f"caption of {args.set[0]} {'changed' if changed else 'unchanged'}")
        return
    edits = curate.Edits(remove=args.remove, replace=[curate.parse_replace(s) for s in args.replace], append=args.add,
                         dedupe=args.dedupe, sort=args.sort, activation=args.activation)
    where = curate.Filter(args.include, args.exclude, match_all=not args.any)
    if edits.describe():
        changed = curate.edit_tags(project, edits, where)
        _say(f"{edits.describe()}: {changed} captions changed (undo with: tags {project.name} --undo)")
    if args.top is not None or args.list or not edits.describe():
        captions = curate.load_captions(project)
        selected = {image: tags for image, tags in captions.items() if where.matches(tags)}
        if args.include or args.exclude:
            _say(f"{len(selected)} of {len(captions)} images match")
        if args.list:
            _say(*[f"{image.name}: {', '.join(tags)}" for image, tags in selected.items()])
            return
        table = curate.tag_frequency(selected)
        top = table[: args.top or 50]
        _say(*[f"{n:6d}  {tag}" for tag, n in top] or ["no tags yet"])
        if len(table) > len(top):
            _say(f"({len(table) - len(top)} more tags; --top N shows more)")
        activation = curate.activation_tags(project)
        if activation:
            _say(f"activation tags: {', '.join(activation)} (keep_tokens {len(activation)})")


def cmd_train(args, project_of) -> None:
    import torch

    from .hosts.standalone import load_checkpoint
    from .paths import default_lora_dir
    from .progress import Control
    from .training import settings as train_settings
    from .training.trainer import train

    project = project_of()
    settings = train_settings.load(project).replace(**train_settings.parse_set(args.settings))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # frozen weights in the autocast dtype on a GPU, as the WebUI keeps them; full precision on the CPU
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.mixed_precision, torch.float32)
    dtype = half if device.startswith("cuda") else torch.float32
    lora_dir = args.lora_dir or default_lora_dir(project.name, project.root)
    host = load_checkpoint(args.checkpoint, args.model_config, device=device, dtype=dtype)
    progress = _progress()
    bar = None

    def show(status) -> None:
        nonlocal bar
        if status.phase != "training":
            if status.message or status.phase not in ("done", "saving"):
                _say(status.message or f"{status.phase}...")
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=status.total_steps, initial=status.step - 1, unit="step", dynamic_ncols=True, disable=None)
        bar.set_postfix_str(f"epoch {status.epoch}/{status.epochs} loss {status.loss:.4f} lr {status.lr:.2e}", refresh=False)
        bar.update(1)

    try:
        result = train(project, host, settings, lora_dir, resume=args.resume, control=Control(), on_status=show,
                       progress=progress)
    finally:
        if bar is not None:
            bar.close()
    _say(*[f"saved {path}" for path in result.files])
    if result.stopped:
        _say(f"stopped after {result.steps} steps; continue with: train {project.name} --resume")
    else:
        _say(f"done: {result.steps} steps; loss log {result.loss_log}")


def cmd_report(args, project_of) -> None:
    from .dataset.report import dataset_report

    _say(dataset_report(project_of(), _progress()).render())


def cmd_trash(args, project_of) -> None:
    from .dataset.trash import list_trash, restore

    project = project_of()
    if args.restore is not None:
        restored = restore(project, args.restore or None)
        _say(f"restored {len(restored)} files to {project.dataset_dir}")
        return
    entries = list_trash(project)
    _say(*[f"{e.name}  ({e.reason}, {e.time})" for e in entries] or ["the trash is empty"])


def cmd_ui(args, project_of) -> None:
    from .api import parse_api_auth
    from .app import launch, standalone_studio

    credentials = parse_api_auth(args.auth)
    if args.listen and not credentials:
        raise LoraMakerError("--listen serves the tab to the whole network: add --auth USER:PASS")
    studio = standalone_studio(args.checkpoint, root=args.root or default_projects_root(), lora_dir=args.lora_dir,
                               model_cache=args.model_cache, device=args.device)
    launch(studio, host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port, credentials=credentials)


def cmd_bench(args, project_of) -> None:
    if args.what == "dedupe":
        from .dev.bench import dedupe_table

        _say(dedupe_table(args.images))
        return
    import torch

    from .dev.bench import train_benchmark, train_row, train_table

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.what == "grid":
        from .dev.bench import grid_benchmark, grid_row, grid_table

        rows = grid_benchmark(args.model or (["sd15", "sdxl"] if gpu else ["tiny", "small"]),
                              steps=args.steps if args.steps is not None else 20, resolution=args.resolution,
                              sampler=args.sampler, device=device,
                              on_row=lambda row: print("  ".join(grid_row(row)), file=sys.stderr, flush=True))
        _say(grid_table(rows, device))
        return
    models = args.model or (["sd15", "sdxl"] if gpu else ["small"])
    steps = args.steps if args.steps is not None else (20 if gpu else 8)
    rows = train_benchmark(models, args.network or ["lora", "locon"], batch=args.batch, steps=steps,
                           resolution=args.resolution, device=device,
                           on_row=lambda row: print("  ".join(train_row(row)), file=sys.stderr, flush=True))
    _say(train_table(rows, device))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = args.root or default_projects_root()

    def project_of(create: bool = False):
        from .project import Project

        return Project.open(root, args.project, create=create)

    try:
        globals()[f"cmd_{args.command}"](args, project_of)
    except LoraMakerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder without write permission: say which file
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (what was done is kept; run the command again to continue)", file=sys.stderr)
        return 130
    return 0
