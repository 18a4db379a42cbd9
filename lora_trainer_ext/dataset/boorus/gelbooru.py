"""Gelbooru and Safebooru: the Gelbooru "dapi" (XML/JSON posts by page or id cursor)."""

from __future__ import annotations

import html
import json
import posixpath
import re
from typing import Iterator
from urllib.parse import quote, quote_plus

from .base import Booru, Post, _ext_of, _int, normalise_query


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
