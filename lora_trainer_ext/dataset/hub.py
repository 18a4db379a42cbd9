"""Model downloads from the Hugging Face hub (or a mirror), without the huggingface_hub package.

A repo's files land in `<cache>/<owner>--<name>/<file>`, fetched from `{endpoint}/{repo}/resolve/main/{file}`
through `net.Http.download`: resumable, renamed into place only when complete, so a file that is there
is whole and is never fetched again (a cached model works offline). `HF_ENDPOINT` picks a mirror and
`HF_TOKEN` opens gated or private repos, as with the hub's own tools.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

from ..errors import LoraMakerError
from ..progress import Progress
from .http import Http, HttpError

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MB = 1 << 20


class HubFileMissing(LoraMakerError):
    """The repo (or the file in it) is not on the hub; callers with a fallback file catch this."""


def is_repo_id(text: str) -> bool:
    """`owner/name`, as the hub spells repo ids (no `..`, no deeper path)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def hub_endpoint(explicit: str | None = None) -> str:
    """The argument, else `$HF_ENDPOINT`, else the hub itself."""
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def repo_dir(cache_dir: Path, repo_id: str) -> Path:
    """Where a repo's files are cached; `/` cannot be part of a folder name, `--` (as the hub's own
    cache does) cannot be part of a repo id."""
    return Path(cache_dir) / repo_id.replace("/", "--")


def _check_filename(filename: str) -> None:
    parts = filename.split("/")
    if not filename or filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise LoraMakerError(f"invalid file name {filename!r} for a hub download")


def _auth_headers() -> dict:
    token = os.environ.get("HF_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def download_repo_files(
    repo_id: str,
    filenames: list[str] | tuple[str, ...],
    cache_dir: Path,
    endpoint: str | None = None,
    http: Http | None = None,
    progress: Progress | None = None,
) -> Path:
    """Make sure each of `filenames` of the hub repo `repo_id` is in the cache and return the repo's
    cache folder. Files already there are not fetched again; an interrupted download resumes."""
    if not is_repo_id(repo_id):
        raise LoraMakerError(f"{repo_id!r} is not a Hugging Face repo id (owner/name) or an existing folder")
    for filename in filenames:
        _check_filename(filename)
    progress = progress or Progress()
    folder = repo_dir(cache_dir, repo_id)
    base = hub_endpoint(endpoint)
    http = http or Http(should_stop=progress.should_stop)
    for filename in filenames:
        dest = folder / filename
        if dest.is_file():
            continue
        url = f"{base}/{quote(repo_id)}/resolve/main/{quote(filename)}"
        with progress.task(f"downloading {repo_id}/{filename}", None, unit="MB") as task:
            try:
                http.download(url, dest, on_bytes=_megabytes(task), headers=_auth_headers())
            except HttpError as e:
                raise _explain(e, repo_id, filename, base) from e
    return folder


def _megabytes(task):
    """An `on_bytes` callback advancing `task` by whole megabytes (progress units are counts)."""
    reported = 0

    def on_bytes(done: int, total: int | None) -> None:
        nonlocal reported
        mb = done // _MB
        if mb > reported:
            task.advance(mb - reported, f"{done / _MB:.0f}/{total / _MB:.0f} MB" if total else f"{done / _MB:.0f} MB")
            reported = mb

    return on_bytes


def _explain(error: HttpError, repo_id: str, filename: str, base: str) -> LoraMakerError:
    if error.status == 404:
        return HubFileMissing(f"{base} has no file {filename!r} in repo {repo_id!r}: check the model name")
    if error.status in (401, 403):
        token = "your HF_TOKEN was refused" if _auth_headers() else "set HF_TOKEN to an access token"
        return LoraMakerError(
            f"{base} refused {repo_id}/{filename} (HTTP {error.status}): the repo does not exist or is gated/private; "
            f"check the name, accept its terms on the hub and {token}"
        )
    return LoraMakerError(f"could not download {repo_id}/{filename}: {error} (run again to resume)")
