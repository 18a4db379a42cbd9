"""The commands: each a thin layer over the Studio, the same service the tab and the API call, so a
command refuses what they refuse (an edit while a job of any process works on the project) and
reports what they report (the same plan). Long work runs as the Studio's job, followed by `watch`."""

from __future__ import annotations

import sys

from ..errors import LoraMakerError
from ..jobs import STOPPED
from .watch import run_job


def say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def _confirm(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:  # nobody to answer (a script, a pipe)
        raise LoraMakerError("not downloading without confirmation: pass --yes to download non-interactively") from None


def cmd_scrape(args, studio) -> None:
    # without --api-key/--user-id the client takes the stored ones (environment, WebUI settings)
    query = dict(api_key=args.api_key or "", user_id=args.user_id or "", api_url=args.api_url)
    todo = studio.preview_scrape(args.project, args.booru, args.tags, limit=args.limit, **query)
    say(todo.preview())
    if not todo.posts:
        return
    folder = studio.project(args.project).dataset_dir
    if not args.yes and not _confirm(f"Download {len(todo.posts)} images into {folder}?"):
        say("nothing downloaded")
        return
    job = run_job(studio, studio.start_scrape(args.project, args.booru, args.tags, limit=args.limit,
                                              save_tags=args.save_tags, workers=args.workers, **query))
    result = job.result
    if result is not None:
        say(*[f"rejected #{post_id}: {why}" for post_id, why in result.rejected],
            *[f"failed #{post_id}: {why}" for post_id, why in result.failed], result.summary())


def cmd_dedupe(args, studio) -> None:
    from ..progress import TqdmProgress

    groups, infos = studio.find_duplicates(args.project, args.threshold, TqdmProgress())
    for group in groups:
        k = group.keeper
        say(f"keep {k.name} ({k.width}x{k.height})")
        for dup in group.duplicates:
            say(f"  {'exact copy' if dup.exact else f'{dup.distance:2d} bits'}  {dup.name}")
    for info in infos:
        if info.error:
            say(f"unreadable: {info.name}: {info.error}")
    count = sum(len(g.duplicates) for g in groups)
    if not groups:
        say(f"no duplicates among {len(infos)} images at threshold {args.threshold}")
    elif args.apply:
        moved = studio.trash_duplicates(args.project, groups)
        trash = studio.project(args.project).trash_dir
        say(f"moved {moved} duplicates to {trash} (restore with: trash {args.project} --restore)")
    else:
        say(f"{count} duplicates in {len(groups)} groups; run again with --apply to move them to the trash")


def cmd_tag(args, studio) -> None:
    from ..dataset.tagger import TagOptions

    options = TagOptions(threshold=args.threshold, character_threshold=args.character_threshold, existing=args.existing,
                         include_ratings=args.ratings, batch_size=args.batch_size)
    if args.blacklist is not None:
        options.blacklist = args.blacklist
    say(run_job(studio, studio.start_tagging(args.project, args.tagger, options)).summary)


def cmd_caption(args, studio) -> None:
    say(run_job(studio, studio.start_captioning(args.project, args.model, existing=args.existing)).summary)


def cmd_tags(args, studio) -> None:
    from ..dataset import curate
    from ..dataset.history import History

    name = args.project
    if args.undo:
        edit = studio.undo_edit(name)
        say(f"undone: {edit.description} ({len(edit.changes)} files)" if edit else "nothing to undo")
    elif args.history:
        edits = History(studio.project(name)).edits()
        say(*[f"{e.number:4d}  {e.time}  {e.description} ({len(e.changes)} files)" for e in edits] or ["no edits yet"])
    elif args.set:
        changed = studio.set_caption(name, *args.set)
        say(f"caption of {args.set[0]} {'changed' if changed else 'unchanged'}")
    else:
        edits = curate.Edits(remove=args.remove, replace=[curate.parse_replace(s) for s in args.replace],
                             append=args.add, dedupe=args.dedupe, sort=args.sort, activation=args.activation)
        where = curate.Filter(args.include, args.exclude, match_all=not args.any)
        if edits.describe():
            changed = studio.edit_tags(name, edits, where)
            say(f"{edits.describe()}: {changed} captions changed (undo with: tags {name} --undo)")
        if args.top is not None or args.list or not edits.describe():
            _show_tags(args, studio.project(name), where)


def _show_tags(args, project, where) -> None:
    from ..dataset import curate

    captions = curate.load_captions(project)
    selected = {image: tags for image, tags in captions.items() if where.matches(tags)}
    if args.include or args.exclude:
        say(f"{len(selected)} of {len(captions)} images match")
    if args.list:
        say(*[f"{image.name}: {', '.join(tags)}" for image, tags in selected.items()])
        return
    table = curate.tag_frequency(selected)
    top = table[: args.top or 50]
    say(*[f"{n:6d}  {tag}" for tag, n in top] or ["no tags yet"])
    if len(table) > len(top):
        say(f"({len(table) - len(top)} more tags; --top N shows more)")
    activation = curate.activation_tags(project)
    if activation:
        say(f"activation tags: {', '.join(activation)} (keep_tokens {len(activation)})")


def _settings(args, studio):
    from ..training.settings import parse_set

    return studio.training_settings(args.project).replace(**parse_set(args.settings))


def cmd_plan(args, studio) -> None:
    plan = studio.training_plan(args.project, _settings(args, studio))
    if plan.steps is None:
        raise LoraMakerError(plan.problem)
    say(plan.steps.render(), plan.optimizer, *plan.warnings, *filter(None, [plan.family_defaults]),
        f"VRAM: {plan.estimate.summary()}" + ("" if plan.kind else " (no model given: estimated for SD1)"),
        *([plan.verdict] if plan.verdict else []), *plan.memory_notes)


def cmd_train(args, studio) -> None:
    job = run_job(studio, studio.start_training(args.project, _settings(args, studio), resume=args.resume,
                                                restart=args.restart))
    result = job.result
    if result is None:  # stopped before any step
        say(job.summary or job.state)
        return
    say(*[f"saved {path}" for path in result.files])
    if job.state == STOPPED:
        say(f"stopped after {result.steps} steps; continue with: train {args.project} --resume")
    else:
        say(f"done: {result.steps} steps; loss log {result.loss_log}")


def cmd_report(args, studio) -> None:
    from ..dataset.report import dataset_report
    from ..progress import TqdmProgress

    say(dataset_report(studio.project(args.project), TqdmProgress()).render())


def cmd_trash(args, studio) -> None:
    from ..dataset.trash import list_trash

    if args.restore is not None:
        restored = studio.restore_trash(args.project, args.restore or None)
        say(f"restored {len(restored)} files to {studio.project(args.project).dataset_dir}")
        return
    entries = list_trash(studio.project(args.project))
    say(*[f"{e.name}  ({e.reason}, {e.time})" for e in entries] or ["the trash is empty"])


def cmd_ui(args, studio) -> None:
    from ..api import parse_api_auth
    from ..app import launch

    credentials = parse_api_auth(args.auth)
    if args.listen and not credentials:
        raise LoraMakerError("--listen serves the tab to the whole network: add --auth USER:PASS")
    launch(studio, host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port, credentials=credentials)


def cmd_bench(args, studio) -> None:
    if args.what == "dedupe":
        from ..dev.bench import dedupe_table

        say(dedupe_table(args.images))
        return
    import torch

    from ..dev.bench import train_benchmark, train_row, train_table

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.what == "grid":
        from ..dev.bench_grid import grid_benchmark, grid_row, grid_table

        rows = grid_benchmark(args.model or (["sd15", "sdxl"] if gpu else ["tiny", "small"]),
                              steps=args.steps if args.steps is not None else 20, resolution=args.resolution,
                              sampler=args.sampler, device=device,
                              on_row=lambda row: print("  ".join(grid_row(row)), file=sys.stderr, flush=True))
        say(grid_table(rows, device))
        return
    models = args.model or (["sd15", "sdxl"] if gpu else ["small", "tiny-sdxl"])
    steps = args.steps if args.steps is not None else (10 if gpu else 4)
    rows = train_benchmark(models, args.network or ["lora", "locon"], batch=args.batch, steps=steps,
                           resolution=args.resolution, device=device, rounds=args.rounds,
                           on_row=lambda row: print("  ".join(train_row(row)), file=sys.stderr, flush=True))
    say(train_table(rows, device))
