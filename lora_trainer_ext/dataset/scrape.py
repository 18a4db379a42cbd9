"""Scrape a booru into a project: first a plan (how many posts match, which will be downloaded and
why the others are skipped), then the download itself.

A scrape is re-runnable: images are named `<booru>_<post id><ext>` (the extension from the decoded
image, nothing from the server), so a second run finds them and downloads nothing, and an
interrupted run picks up where it stopped. `limit` counts the posts the dataset has or gets from the
query (already there, trashed or downloaded now), so the same command always means the same posts.
Every downloaded image gets one line in `<project>/sources.jsonl` (booru, post, source, md5) for
credits and for recognising the same picture on another booru.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from .. import files
from ..errors import LoraMakerError, Stopped
from ..progress import Progress
from ..project import Project
from . import images
from .boorus import Booru, Post, normalise_query
from .captions import META_TAGS, format_tag, join_tags
from .curate import activation_tags, dedupe, with_activation
from .history import History
from .http import Http, HttpError
from .trash import trashed_originals

SOURCES_FILE = "sources.jsonl"

# Above this size the booru's sample (when it has one) is fetched instead of the original: a
# 6000x8000 original is tens of MB and gets scaled down for training anyway.
HUGE_PIXELS = 3072 * 3072
HUGE_SIDE = 4096
# Whatever is fetched is scaled down to at most this many pixels before it is saved.
MAX_PIXELS = 4096 * 4096

# Why a listed post is not downloaded.
SKIP_LISTED_TWICE = "listed twice"
SKIP_DELETED = "deleted"
SKIP_HIDDEN = "no file (hidden or banned)"
SKIP_ANIMATED = "video or animation"
SKIP_TRASHED = "in the trash"
SKIP_PRESENT = "already in the dataset"
SKIP_SAME_IMAGE_HAVE = "same image already downloaded"
SKIP_SAME_IMAGE_PLANNED = "same image as another post"
# Skips that mean "we have it": they count towards the limit, so re-running fetches nothing new.
_HAVE = {SKIP_TRASHED, SKIP_PRESENT, SKIP_SAME_IMAGE_HAVE}


def image_stem(post: Post) -> str:
    """The dataset name of a post's image, without extension: only the booru's name and the id."""
    return f"{post.booru}_{int(post.id)}"


@dataclass
class Plan:
    booru: str
    tags: str
    count: int | None  # posts matching the query (None: the booru won't say)
    limit: int | None
    browse_url: str
    client: Booru = field(repr=False)
    posts: list[Post] = field(default_factory=list)  # to download
    skipped: Counter = field(default_factory=Counter)  # reason -> posts
    notes: list[str] = field(default_factory=list)

    def preview(self, first: int = 5) -> str:
        """A short human summary of what `download` would do."""
        matching = "an unknown number of" if self.count is None else f"{self.count:,}"
        lines = [f"{self.client.title}: {matching} posts match '{self.tags}' ({self.browse_url})"]
        have = sum(n for reason, n in self.skipped.items() if reason in _HAVE)
        limit = f" (limit {self.limit})" if self.limit is not None else ""
        lines.append(f"Will download {len(self.posts)}{limit}; already have {have}.")
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
            lines.append(f"Skipped: {reasons}")
        if self.posts:
            shown = ", ".join(f"#{p.id} {p.width}x{p.height}{p.ext}" for p in self.posts[:first])
            more = f" and {len(self.posts) - first} more" if len(self.posts) > first else ""
            lines.append(f"First: {shown}{more}")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)


def _sources_path(project: Project) -> Path:
    return project.path / SOURCES_FILE


def read_sources(project: Project) -> list[dict]:
    """The provenance records, oldest first (a line torn by a crash is ignored)."""
    try:
        text = _sources_path(project).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _md5s_we_have(project: Project, names: set[str]) -> set[str]:
    """md5s of downloaded originals whose image is still in the dataset or the trash (`names`)."""
    return {r["md5"] for r in read_sources(project) if r.get("md5") and r.get("file") in names}


def _skip_reason(
    post: Post, seen: set[int], trashed: set[str], present: set[str], have_md5: set[str], planned_md5: set[str]
) -> str | None:
    if post.id in seen:
        return SKIP_LISTED_TWICE
    if post.deleted:
        return SKIP_DELETED
    if not post.file_url:
        return SKIP_HIDDEN
    if post.animated:
        return SKIP_ANIMATED
    if image_stem(post) in trashed:
        return SKIP_TRASHED
    if image_stem(post) in present:
        return SKIP_PRESENT
    if post.md5 and post.md5 in have_md5:
        return SKIP_SAME_IMAGE_HAVE
    if post.md5 and post.md5 in planned_md5:
        return SKIP_SAME_IMAGE_PLANNED
    return None


def plan(
    project: Project, client: Booru, tags: str, limit: int | None = None, progress: Progress | None = None
) -> Plan:
    """Count the matches and walk the listing until `limit` posts that the dataset has or will get
    are found (all of them when None), sorting each post into "download" or "skipped, because"."""
    progress = progress or Progress()
    query = normalise_query(tags)
    if limit is not None and limit < 1:
        raise LoraMakerError(f"the post limit must be at least 1, got {limit}")
    result = Plan(client.name, query, client.count(query), limit, client.browse_url(query), client)
    present_images = project.images()
    present = {p.stem for p in present_images}
    trashed_names = trashed_originals(project)
    trashed = {Path(n).stem for n in trashed_names}
    have_md5 = _md5s_we_have(project, {p.name for p in present_images} | trashed_names)
    seen: set[int] = set()
    planned_md5: set[str] = set()
    taken = 0
    with progress.task(f"listing {client.title}", limit or result.count, unit="post") as task:
        for post in client.posts(query):
            if progress.should_stop():
                raise Stopped("stopped by the user")
            reason = _skip_reason(post, seen, trashed, present, have_md5, planned_md5)
            seen.add(post.id)
            if reason is None:
                result.posts.append(post)
                if post.md5:
                    planned_md5.add(post.md5)
            else:
                result.skipped[reason] += 1
            if reason is None or reason in _HAVE:
                taken += 1
                task.advance(note=f"#{post.id}")
                if limit is not None and taken >= limit:
                    break
    result.notes = list(client.notes)
    return result


@dataclass
class Result:
    downloaded: list[Path] = field(default_factory=list)
    skipped_existing: list[Path] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (post id, why the image is unusable)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (post id, network failure after retries)
    captioned: int = 0
    stopped: bool = False

    def summary(self) -> str:
        parts = [f"downloaded {len(self.downloaded)}", f"already had {len(self.skipped_existing)}"]
        if self.captioned:
            parts.append(f"captioned {self.captioned}")
        if self.rejected:
            parts.append(f"rejected {len(self.rejected)}")
        if self.failed:
            parts.append(f"failed {len(self.failed)} (run again to retry)")
        if self.stopped:
            parts.append("stopped early (run again to continue)")
        return ", ".join(parts)


def _fetch_urls(post: Post) -> list[str]:
    """Sample first for huge originals (the original stays the fallback), else the original."""
    huge = post.pixels > HUGE_PIXELS or max(post.width, post.height) > HUGE_SIDE
    return [post.sample_url, post.file_url] if huge and post.sample_url else [post.file_url]


def _fetch(http: Http, post: Post, dataset: Path, max_pixels: int | None, should_stop) -> tuple[str, object]:
    """Download, check and save one post's image. Returns ("saved", path), ("rejected", reason),
    ("failed", message) or ("stopped", None); runs in a worker thread."""
    if should_stop():
        return "stopped", None
    outcome: tuple[str, object] = ("failed", "nothing to fetch")
    for url in _fetch_urls(post):
        try:
            image = images.normalise(http.get_bytes(url), max_pixels=max_pixels)
        except Stopped:
            return "stopped", None
        except images.ImageRejected as e:
            outcome = ("rejected", str(e))
            continue
        except HttpError as e:
            outcome = ("failed", str(e))
            continue
        path = dataset / f"{image_stem(post)}{image.ext}"
        files.write_bytes(path, image.data)
        return "saved", path
    return outcome


def caption_tags(post: Post, activation: list[str]) -> list[str]:
    """A post's tags as a starting caption: bookkeeping tags dropped, spelled like a prompt
    (spaces, escaped parentheses), the project's activation tags first."""
    tags = [format_tag(t) for t in post.tags if t.lower() not in META_TAGS]
    return dedupe(with_activation(tags, activation))


def _provenance(post: Post, path: Path) -> dict:
    return {
        "file": path.name,
        "booru": post.booru,
        "id": post.id,
        "post_url": post.page_url,
        "file_url": post.file_url,
        "source": post.source,
        "md5": post.md5,
        "rating": post.rating,
        "score": post.score,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def download(
    project: Project,
    plan: Plan,
    workers: int = 4,
    save_tags: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    progress: Progress | None = None,
) -> Result:
    """Download the plan's posts with `workers` parallel fetches. Images already in the dataset are
    skipped; unusable ones are rejected with a reason; network failures are listed (a re-run retries
    them). With `save_tags`, each new image without a caption gets its post's tags, all in one
    undoable edit."""
    progress = progress or Progress()
    result = Result()
    present = {p.stem: p for p in project.images()}
    todo = []
    for post in plan.posts:
        if image_stem(post) in present:
            result.skipped_existing.append(present[image_stem(post)])
        else:
            todo.append(post)
    if not todo:
        return result
    activation = activation_tags(project) if save_tags else []
    project.dataset_dir.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="booru")
    try:
        with History(project).begin(f"captions from {plan.client.title} tags") as edit, open(
            _sources_path(project), "a", encoding="utf-8"
        ) as sources, progress.task(f"downloading from {plan.client.title}", len(todo)) as task:
            http, dataset = plan.client.http, project.dataset_dir
            pending: dict[Future, Post] = {
                pool.submit(_fetch, http, post, dataset, max_pixels, progress.should_stop): post for post in todo
            }
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    post = pending.pop(future)
                    kind, value = future.result()
                    if kind == "saved":
                        path = Path(value)  # type: ignore[arg-type]
                        result.downloaded.append(path)
                        sources.write(json.dumps(_provenance(post, path), ensure_ascii=False) + "\n")
                        sources.flush()
                        caption = Project.caption_path(path)
                        if save_tags and not caption.exists():
                            tags = caption_tags(post, activation)
                            if tags:
                                result.captioned += edit.set(caption, join_tags(tags))
                    elif kind == "rejected":
                        result.rejected.append((post.id, str(value)))
                    elif kind == "failed":
                        result.failed.append((post.id, str(value)))
                    else:
                        result.stopped = True
                    task.advance(note=f"#{post.id}")
                if progress.should_stop() and pending:
                    result.stopped = True
                    for future in pending:
                        future.cancel()
                    pending = {f: p for f, p in pending.items() if not f.cancelled()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    result.downloaded.sort()
    return result
