"""What every booru client shares: the `Booru` interface, `Post`, credentials and the checks of what a server
sends."""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import unquote, urljoin, urlparse

from ... import paths
from ...errors import LoraMakerError
from ..http import Http, HttpError

BOORUS = ("gelbooru", "safebooru", "danbooru")

# File types that are never a still image, and tags that mark animation even where the file type
# can't tell (a .gif may or may not move; a .zip on Danbooru is an ugoira).
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".zip", ".swf"})
ANIMATED_TAGS = frozenset({"animated", "video", "animated_gif", "animated_png", "ugoira", "flash"})

_EXT = re.compile(r"^\.[a-z0-9]{1,5}$")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)

_CREDENTIALS_HELP = {
    "gelbooru": (
        "Gelbooru needs an API key and user id: copy both from "
        "https://gelbooru.com/index.php?page=account&s=options (API Access Credentials) and pass them with "
        "--api-key and --user-id, set LORA_MAKER_GELBOORU_API_KEY and LORA_MAKER_GELBOORU_USER_ID, "
        "or fill them in Settings > LoRA Maker"
    ),
    "danbooru": (
        "Danbooru takes your login name and an API key (create one on your Danbooru profile page, "
        "API Key): pass them with --user-id and --api-key, set LORA_MAKER_DANBOORU_USER_ID and "
        "LORA_MAKER_DANBOORU_API_KEY, or fill them in Settings > LoRA Maker"
    ),
    "safebooru": "Safebooru needs no account: it may be blocking this address for now; try again later",
}


def credentials(name: str) -> tuple[str, str]:
    """(api_key, user_id) for booru `name` from the environment (LORA_MAKER_<BOORU>_API_KEY /
    _USER_ID) or else the WebUI settings (lora_maker_<booru>_api_key / _user_id); "" when unset."""
    settings = paths.webui_settings()
    found = []
    for what in ("api_key", "user_id"):
        value = os.environ.get(f"LORA_MAKER_{name.upper()}_{what.upper()}") or settings.get(f"lora_maker_{name}_{what}")
        found.append(str(value or "").strip())
    return found[0], found[1]


def normalise_query(tags: str | list[str] | tuple[str, ...]) -> str:
    """The user's tag query as one space-separated string (`-tag` excludes and `rating:`/`score:`
    metatags pass through as typed); an empty query is refused."""
    text = " ".join(tags) if isinstance(tags, (list, tuple)) else str(tags or "")
    query = " ".join(text.split())
    if not query:
        raise LoraMakerError("the tag query is empty: give at least one tag, e.g. '1girl solo -comic rating:general'")
    return query


def _ext_of(url: str, given: str = "") -> str:
    """The file type as ".ext", from the booru's own field or the URL path; "" when it looks odd."""
    ext = ("." + given.lstrip(".")) if given else posixpath.splitext(unquote(urlparse(url).path))[1]
    ext = ext.lower()
    return ext if _EXT.match(ext) else ""


def _int(value, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _describe(text: str) -> str:
    """What came back instead of JSON, short enough for a one-line message."""
    stripped = text.strip()
    if not stripped:
        return "an empty reply"
    if stripped[:200].lower().lstrip().startswith(("<!doctype html", "<html")) or "<body" in stripped[:2000].lower():
        title = _TITLE.search(stripped)
        label = " ".join(html.unescape(title.group(1)).split())[:80] if title else ""
        return f'an HTML page "{label}"' if label else "an HTML page"
    first = stripped.splitlines()[0]
    return f'"{first[:100]}{"..." if len(first) > 100 else ""}"'


@dataclass
class Post:
    booru: str
    id: int
    file_url: str  # "" when the booru hides the file (banned, paid-only)
    sample_url: str = ""  # a smaller rendition, "" when none
    width: int = 0
    height: int = 0
    ext: str = ""  # ".jpg"; a hint only, never used in a path
    md5: str = ""
    tags: list[str] = field(default_factory=list)  # raw booru tag names
    tags_by_category: dict[str, list[str]] = field(default_factory=dict)  # Danbooru only
    rating: str = ""  # general / sensitive / questionable / explicit (or the booru's word)
    score: int | None = None
    source: str = ""  # where the artist posted it, as the booru records it
    page_url: str = ""  # the post's page on the booru
    deleted: bool = False

    @property
    def animated(self) -> bool:
        """Video or animation: skipped, a LoRA dataset takes still images. A .gif counts only when
        tagged so (a still .gif is fine; normalise() rejects a moving one the tags missed)."""
        return self.ext in VIDEO_EXTS or not ANIMATED_TAGS.isdisjoint(self.tags)

    @property
    def pixels(self) -> int:
        return self.width * self.height


class Booru:
    """One booru's API. `posts` pages internally and yields posts newest first; `notes` collects
    remarks about the last listing (e.g. where deep paging had to stop)."""

    name = ""
    title = ""
    default_url = ""
    page_size = 100

    def __init__(self, api_url: str | None = None, api_key: str = "", user_id: str = "", http: Http | None = None):
        self.base = (api_url or self.default_url).rstrip("/")
        if not api_key and not user_id:
            api_key, user_id = credentials(self.name)
        self.api_key = api_key.strip()
        self.user_id = user_id.strip()
        self.http = http or Http()
        self.notes: list[str] = []

    def count(self, tags: str) -> int | None:
        """How many posts match (None when the booru won't say)."""
        raise NotImplementedError

    def posts(self, tags: str, limit: int | None = None) -> Iterator[Post]:
        """The matching posts, newest first, at most `limit`."""
        self.notes = []
        query = normalise_query(tags)
        if limit is not None and limit < 1:
            return
        for n, post in enumerate(self._walk(query), 1):
            yield post
            if limit is not None and n >= limit:
                return  # before asking for another page

    def browse_url(self, tags: str) -> str:
        """The web page showing the same query, for a human to look at."""
        raise NotImplementedError

    def post_url(self, post_id: int) -> str:
        raise NotImplementedError

    def _walk(self, query: str) -> Iterator[Post]:
        raise NotImplementedError

    def _url(self, url) -> str:
        """A file URL from an answer made absolute (some give "//host/path" or "/path"); "" unless
        it is http(s), so nothing but the web is ever fetched."""
        full = urljoin(f"{self.base}/", str(url or "").strip()) if url else ""
        return full if urlparse(full).scheme in ("http", "https") else ""

    # -- talking to the server -------------------------------------------------------------------

    def _get_text(self, path: str, params: dict) -> str:
        try:
            return self.http.get(f"{self.base}{path}", params=params).text
        except HttpError as e:
            raise self._refused(e) from e

    def _get_json(self, path: str, params: dict):
        text = self._get_text(path, params)
        try:
            return json.loads(text)
        except ValueError:
            raise self._not_json(text) from None

    def _not_json(self, text: str) -> LoraMakerError:
        return LoraMakerError(
            f"{self.title} answered with {_describe(text)} instead of data: the site may be down, in "
            f"maintenance or behind a browser check; try again later (or open {self.base} in a browser)"
        )

    def _refused(self, e: HttpError) -> LoraMakerError:
        if e.status in (401, 403):
            given = "rejected the credentials given" if (self.api_key or self.user_id) else "refused the request"
            message = f"{self.title} {given} (HTTP {e.status}). {_CREDENTIALS_HELP[self.name]}"
            return HttpError(message, e.status, e.body)
        return HttpError(f"{self.title}: {e}", e.status, e.body)
