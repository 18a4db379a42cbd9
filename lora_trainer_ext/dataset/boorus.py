"""Booru clients: Gelbooru, Safebooru and Danbooru behind one interface (`count`, `posts`,
`browse_url`), yielding `Post`s with everything the scraper needs.

Everything a server sends is data, never a path: file names are made from post ids by the scraper,
and `Post.ext` is only a hint checked against a short pattern. Answers that are not what the API
promises (an HTML page from a browser check, maintenance text, a refusal) become one-line
`LoraMakerError`s naming the booru and what came back.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import quote, quote_plus, unquote, urljoin, urlparse

from .. import paths
from ..errors import LoraMakerError
from .http import Http, HttpError

BOORUS = ("gelbooru", "safebooru", "danbooru")

# File types that are never a still image, and tags that mark animation even where the file type
# can't tell (a .gif may or may not move; a .zip on Danbooru is an ugoira).
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".zip", ".swf"})
ANIMATED_TAGS = frozenset({"animated", "video", "animated_gif", "animated_png", "ugoira", "flash"})

_EXT = re.compile(r"^\.[a-z0-9]{1,5}$")
_DANBOORU_RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
_DANBOORU_CATEGORIES = ("general", "character", "copyright", "artist", "meta")
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


class _Dapi(Booru):
    """The Gelbooru-style `index.php?page=dapi` API shared by Gelbooru and Safebooru."""

    def browse_url(self, tags: str) -> str:
        return f"{self.base}/index.php?page=post&s=list&tags={quote_plus(normalise_query(tags))}"

    def post_url(self, post_id: int) -> str:
        return f"{self.base}/index.php?page=post&s=view&id={post_id}"

    def _params(self, **extra) -> dict:
        params = {"page": "dapi", "s": "post", "q": "index", **extra}
        if self.api_key:
            params["api_key"] = self.api_key
        if self.user_id:
            params["user_id"] = self.user_id
        return params

    def _page(self, query: str, pid: int) -> list[dict] | None:
        """One page of raw posts; None when the server refuses to page this deep."""
        raise NotImplementedError

    def _pid_pages(self, query: str, deep_limit: int | None) -> Iterator[Post]:
        pid = 0
        while True:
            if deep_limit is not None and pid * self.page_size >= deep_limit:
                self._too_deep(pid * self.page_size)
                return
            page = self._page(query, pid)
            if page is None:
                self._too_deep(pid * self.page_size)
                return
            if not page:
                return
            yield from self._parse_all(page)
            pid += 1

    def _too_deep(self, offset: int) -> None:
        self.notes.append(
            f"{self.title} lists only the first {offset} posts of this query; stopped there "
            "(narrow the query, or drop sort: so the listing can page by id)"
        )

    def _parse_all(self, page: list[dict]) -> Iterator[Post]:
        for raw in page:
            if isinstance(raw, dict) and _int(raw.get("id"), -1) >= 0:
                yield self._post(raw)

    def _post(self, raw: dict) -> Post:
        raise NotImplementedError

    @staticmethod
    def _too_deep_text(text: str) -> bool:
        return text.lstrip().lower().startswith("too deep")


class Gelbooru(_Dapi):
    name = "gelbooru"
    title = "Gelbooru"
    default_url = "https://gelbooru.com"
    page_size = 100  # the API's maximum
    DEEP_LIMIT = 20000  # pid * limit past this answers "Too deep!"

    def count(self, tags: str) -> int | None:
        data = self._get_json("/index.php", self._params(json=1, limit=1, pid=0, tags=normalise_query(tags)))
        if isinstance(data, dict):
            return _int((data.get("@attributes") or {}).get("count"), None)  # type: ignore[arg-type]
        return None

    def _walk(self, query: str) -> Iterator[Post]:
        if "sort:" in query:  # another order: id cursors don't apply, page by number up to the cap
            yield from self._pid_pages(query, self.DEEP_LIMIT)
            return
        # Newest first by id, so "id:<lowest seen" is the next page at any depth.
        lowest = None
        while True:
            page = self._page(query if lowest is None else f"{query} id:<{lowest}", 0)
            posts = list(self._parse_all(page or []))
            fresh = [p for p in posts if lowest is None or p.id < lowest]
            if not fresh:
                return
            yield from posts
            lowest = min(p.id for p in fresh)

    def _page(self, query: str, pid: int) -> list[dict] | None:
        params = self._params(json=1, limit=self.page_size, pid=pid, tags=query)
        text = self._get_text("/index.php", params)
        if self._too_deep_text(text):
            return None
        try:
            data = json.loads(text)
        except ValueError:
            raise self._not_json(text) from None
        if isinstance(data, list):  # "[]" from older versions or refusals dressed as success
            return data
        if not isinstance(data, dict):
            raise self._not_json(text)
        posts = data.get("post", [])  # absent for no results; a lone post may come as a dict
        return [posts] if isinstance(posts, dict) else list(posts or [])

    def _post(self, raw: dict) -> Post:
        file_url = self._url(raw.get("file_url"))
        return Post(
            booru=self.name,
            id=_int(raw["id"]),
            file_url=file_url,
            sample_url=self._url(raw.get("sample_url")),
            width=_int(raw.get("width")),
            height=_int(raw.get("height")),
            ext=_ext_of(file_url or str(raw.get("image") or "")),
            md5=str(raw.get("md5") or ""),
            tags=html.unescape(str(raw.get("tags") or "")).split(),
            rating=str(raw.get("rating") or ""),
            score=_int(raw.get("score"), None),  # type: ignore[arg-type]
            source=str(raw.get("source") or ""),
            page_url=self.post_url(_int(raw["id"])),
            deleted=str(raw.get("status") or "") == "deleted",
        )


class Safebooru(_Dapi):
    name = "safebooru"
    title = "Safebooru"
    default_url = "https://safebooru.org"
    page_size = 100

    def count(self, tags: str) -> int | None:
        # Its JSON has no total; the XML form does: <posts count="N" offset="0">.
        text = self._get_text("/index.php", self._params(limit=0, tags=normalise_query(tags)))
        found = re.search(r"<posts\b[^>]*\bcount=\"(\d+)\"", text)
        if not found:
            raise self._not_json(text)
        return int(found.group(1))

    def _walk(self, query: str) -> Iterator[Post]:
        yield from self._pid_pages(query, None)

    def _page(self, query: str, pid: int) -> list[dict] | None:
        text = self._get_text("/index.php", self._params(json=1, limit=self.page_size, pid=pid, tags=query))
        if self._too_deep_text(text):
            return None
        if not text.strip():  # its answer to "no results"
            return []
        try:
            data = json.loads(text)
        except ValueError:
            raise self._not_json(text) from None
        if not isinstance(data, list):
            raise self._not_json(text)
        return data

    def _post(self, raw: dict) -> Post:
        directory = quote(str(raw.get("directory") or ""), safe="/")
        image = str(raw.get("image") or "")
        file_url = self._url(raw.get("file_url"))
        if not file_url and directory and image:
            file_url = f"{self.base}/images/{directory}/{quote(image, safe='')}"
        sample_url = self._url(raw.get("sample_url"))
        if not sample_url and raw.get("sample") in (True, 1, "1", "true") and directory and image:
            stem = posixpath.splitext(posixpath.basename(image))[0]
            sample_url = f"{self.base}/samples/{directory}/sample_{quote(stem, safe='')}.jpg"
        post_id = _int(raw["id"])
        return Post(
            booru=self.name,
            id=post_id,
            file_url=file_url,
            sample_url=sample_url,
            width=_int(raw.get("width")),
            height=_int(raw.get("height")),
            ext=_ext_of(file_url or image),
            md5=str(raw.get("hash") or raw.get("md5") or ""),
            tags=html.unescape(str(raw.get("tags") or "")).split(),
            rating=str(raw.get("rating") or ""),
            score=_int(raw.get("score"), None),  # type: ignore[arg-type]
            source=str(raw.get("source") or ""),
            page_url=self.post_url(post_id),
        )


class Danbooru(Booru):
    name = "danbooru"
    title = "Danbooru"
    default_url = "https://danbooru.donmai.us"
    page_size = 200  # the API's maximum
    PAGE_LIMIT = 1000  # numbered pages stop here; id cursors ("b<id>") have no limit

    def browse_url(self, tags: str) -> str:
        return f"{self.base}/posts?tags={quote_plus(normalise_query(tags))}"

    def post_url(self, post_id: int) -> str:
        return f"{self.base}/posts/{post_id}"

    def _auth(self, params: dict) -> dict:
        if self.user_id:
            params["login"] = self.user_id
        if self.api_key:
            params["api_key"] = self.api_key
        return params

    def count(self, tags: str) -> int | None:
        data = self._get_json("/counts/posts.json", self._auth({"tags": normalise_query(tags)}))
        counts = data.get("counts") if isinstance(data, dict) else None
        return _int(counts.get("posts"), None) if isinstance(counts, dict) else None  # type: ignore[arg-type]

    def _walk(self, query: str) -> Iterator[Post]:
        numbered = "order:" in query  # another order: id cursors don't apply
        lowest = None
        page_number = 1
        while True:
            params = self._auth({"tags": query, "limit": self.page_size})
            if numbered:
                if page_number > self.PAGE_LIMIT:
                    self.notes.append(f"Danbooru lists only {self.PAGE_LIMIT} pages of an order: query; stopped there")
                    return
                params["page"] = page_number
            elif lowest is not None:
                params["page"] = f"b{lowest}"
            data = self._get_json("/posts.json", params)
            if not isinstance(data, list):
                raise self._not_json(json.dumps(data)[:200])
            posts = [self._post(raw) for raw in data if isinstance(raw, dict) and _int(raw.get("id"), -1) >= 0]
            fresh = [p for p in posts if lowest is None or p.id < lowest] if not numbered else posts
            if not fresh:
                return
            yield from posts
            lowest = min(p.id for p in fresh)
            page_number += 1

    def _post(self, raw: dict) -> Post:
        post_id = _int(raw["id"])
        file_url = self._url(raw.get("file_url"))
        large = self._url(raw.get("large_file_url"))
        return Post(
            booru=self.name,
            id=post_id,
            file_url=file_url,
            sample_url=large if large != file_url else "",
            width=_int(raw.get("image_width")),
            height=_int(raw.get("image_height")),
            ext=_ext_of(file_url, str(raw.get("file_ext") or "")),
            md5=str(raw.get("md5") or ""),
            tags=str(raw.get("tag_string") or "").split(),
            tags_by_category={c: str(raw.get(f"tag_string_{c}") or "").split() for c in _DANBOORU_CATEGORIES},
            rating=_DANBOORU_RATINGS.get(str(raw.get("rating") or ""), str(raw.get("rating") or "")),
            score=_int(raw.get("score"), None),  # type: ignore[arg-type]
            source=str(raw.get("source") or ""),
            page_url=self.post_url(post_id),
            deleted=bool(raw.get("is_deleted")),
        )

    def _refused(self, e: HttpError) -> LoraMakerError:
        if e.status == 422:  # a search the account level doesn't allow, e.g. too many tags
            try:
                message = str(json.loads(e.body).get("message") or "").strip()
            except (ValueError, AttributeError):
                message = ""
            return HttpError(
                f"Danbooru refused the search: {(message or 'HTTP 422').rstrip('.')}. Use fewer tags, or log in "
                f"with an account that may search more (Danbooru Gold and up): {_CREDENTIALS_HELP['danbooru']}",
                e.status,
                e.body,
            )
        return super()._refused(e)


_CLIENTS = {c.name: c for c in (Gelbooru, Safebooru, Danbooru)}


def make_client(
    name: str, api_url: str | None = None, api_key: str = "", user_id: str = "", http: Http | None = None
) -> Booru:
    """The client for booru `name` (one of BOORUS)."""
    cls = _CLIENTS.get((name or "").strip().lower())
    if cls is None:
        raise LoraMakerError(f"unknown booru {name!r}: choose one of {', '.join(BOORUS)}")
    return cls(api_url=api_url, api_key=api_key, user_id=user_id, http=http)
