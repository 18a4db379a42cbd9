"""Booru clients: Gelbooru, Safebooru and Danbooru behind one interface (`count`, `posts`,
`browse_url`), yielding `Post`s with everything the scraper needs. base.py holds the interface and what
every client shares; each API lives in a small file of its own (gelbooru.py: Gelbooru and Safebooru's
shared "dapi"; danbooru.py).

Everything a server sends is data, never a path: file names are made from post ids by the scraper,
and `Post.ext` is only a hint checked against a short pattern. Answers that are not what the API
promises (an HTML page from a browser check, maintenance text, a refusal) become one-line
`LoraMakerError`s naming the booru and what came back.
"""

from __future__ import annotations

from ...errors import LoraMakerError
from ..http import Http
from .base import BOORUS, Booru, Post, credentials, normalise_query
from .danbooru import Danbooru
from .gelbooru import Gelbooru, Safebooru

__all__ = ["BOORUS", "Booru", "Danbooru", "Gelbooru", "Post", "Safebooru", "credentials", "make_client",
           "normalise_query"]

_CLIENTS = {c.name: c for c in (Gelbooru, Safebooru, Danbooru)}


def make_client(
    name: str, api_url: str | None = None, api_key: str = "", user_id: str = "", http: Http | None = None
) -> Booru:
    """The client for booru `name` (one of BOORUS)."""
    cls = _CLIENTS.get((name or "").strip().lower())
    if cls is None:
        raise LoraMakerError(f"unknown booru {name!r}: choose one of {', '.join(BOORUS)}")
    return cls(api_url=api_url, api_key=api_key, user_id=user_id, http=http)
