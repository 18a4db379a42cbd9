"""Danbooru: its JSON API (posts by page, tag categories, login + API key)."""

from __future__ import annotations

import json
from typing import Iterator
from urllib.parse import quote_plus

from ...errors import LoraMakerError
from ..http import HttpError
from .base import _CREDENTIALS_HELP, Booru, Post, _ext_of, _int, normalise_query

_RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
_CATEGORIES = ("general", "character", "copyright", "artist", "meta")


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
            tags_by_category={c: str(raw.get(f"tag_string_{c}") or "").split() for c in _CATEGORIES},
            rating=_RATINGS.get(str(raw.get("rating") or ""), str(raw.get("rating") or "")),
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
