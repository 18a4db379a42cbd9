"""A fake Gelbooru, Safebooru and Danbooru on 127.0.0.1 for tests, with fault injection.

    with serve_booru(make_posts(5)) as server:
        client = Gelbooru(server.base("gelbooru"), http=fast_http())

One threaded http.server answers all three APIs under /gelbooru, /safebooru and /danbooru, over the
same in-memory posts (real small images made with Pillow), and serves their files under
<booru>/images/<id>/<name> and <booru>/samples/<id>/<name>. Faults are queued per route with
`server.faults.add(route, fault, times)`; `server.requests` records every request for assertions.
Other test files use it too: `from booru_server import serve_booru, make_posts` (pytest puts tests/
on sys.path), or the `booru_server` fixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlparse

import pytest
from PIL import Image, ImageDraw

from lora_trainer_ext.dataset.http import Http

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head><body>checking...</body></html>"


def fast_http(retries: int = 3, **kwargs) -> Http:
    """An Http that gives up quickly: short backoff and a read timeout shorter than a "slow" reply."""
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("timeout", (2.0, 0.5))
    return Http(retries=retries, **kwargs)


# -- posts -------------------------------------------------------------------------------------------


def make_image(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (32, 24), alpha: bool = False) -> bytes:
    """A small image that differs from every other seed (colour and a block at a seed-dependent place)."""
    mode = "RGBA" if alpha else "RGB"
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29 + 80) % 256)
    img = Image.new(mode, size, colour + ((0,) if alpha else ()))  # alpha: transparent background
    x = seed % max(1, size[0] - 8)
    ImageDraw.Draw(img).rectangle((x, 4, x + 7, 11), fill=(250, 20, 20) + ((255,) if alpha else ()))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def animated_gif(seed: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), (seed % 256, i * 100, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


@dataclass
class FakePost:
    id: int
    data: bytes  # the file the booru serves
    ext: str  # ".jpg", ".png", ".webm", ...
    tags: list[str] = field(default_factory=lambda: ["1girl", "solo"])
    width: int = 0  # what the API claims; 0: the real size of `data`
    height: int = 0
    rating: str = "general"
    score: int = 0
    source: str = ""
    name: str = ""  # the booru's file name for it ("image" field); default "<md5><ext>"
    sample: bytes | None = None  # a smaller rendition served as the sample
    hidden: bool = False  # Danbooru: no file_url / md5 (banned)
    deleted: bool = False
    md5: str = ""
    file_url: str = ""  # what the API gives as file_url, verbatim; default: where the server serves it

    def __post_init__(self):
        self.md5 = self.md5 or hashlib.md5(self.data).hexdigest()
        self.name = self.name or f"{self.md5}{self.ext}"
        if not self.width:
            try:
                self.width, self.height = Image.open(io.BytesIO(self.data)).size
            except Exception:
                self.width, self.height = 640, 480  # a video or broken bytes: any claim will do


def make_posts(n: int, start_id: int = 100, tags: tuple[str, ...] = ("1girl", "solo")) -> list[FakePost]:
    """`n` still-image posts with ids start_id.. start_id+n-1: distinct images alternating JPEG and
    PNG with transparency."""
    posts = []
    for i in range(n):
        if i % 2:
            posts.append(FakePost(start_id + i, make_image(start_id + i, "PNG", alpha=True), ".png", list(tags)))
        else:
            posts.append(FakePost(start_id + i, make_image(start_id + i), ".jpg", list(tags)))
    return posts


def video_post(post_id: int) -> FakePost:
    # Tagged like a still on purpose: the file type alone must be enough to skip it.
    return FakePost(post_id, b"\x1a\x45\xdf\xa3 not really a webm", ".webm", ["1girl"])


def animated_gif_post(post_id: int) -> FakePost:
    return FakePost(post_id, animated_gif(post_id), ".gif", ["1girl", "animated", "animated_gif"])


# -- faults ------------------------------------------------------------------------------------------


class Faults:
    """Queued misbehaviour per route: "api" (any listing or count), "image" (any file), or
    "image:<id>" (one post's file; checked before "image"). A fault is an HTTP status (429 comes
    with Retry-After: 0), "slow" (answer after `server.slow_seconds`), "html" (a 200 HTML page),
    "cut" (Content-Length of the whole body, half of it sent, connection closed) or "truncated"
    (half the body with an honest Content-Length). `times=None` repeats it forever."""

    def __init__(self):
        self._queues: dict[str, list] = defaultdict(list)
        self._lock = threading.Lock()

    def add(self, route: str, fault, times: int | None = 1) -> "Faults":
        with self._lock:
            self._queues[route].append([fault, times])
        return self

    def take(self, *routes: str):
        with self._lock:
            for route in routes:
                queue = self._queues.get(route)
                if queue:
                    fault, times = queue[0]
                    if times is not None:
                        queue[0][1] -= 1
                        if queue[0][1] <= 0:
                            queue.pop(0)
                    return fault
        return None


# -- the server --------------------------------------------------------------------------------------


def _matches(post: FakePost, terms: list[str]) -> bool:
    for term in terms:
        if term.startswith("-"):
            if term[1:] in post.tags:
                return False
        elif term.startswith("rating:"):
            if post.rating[:1] != term.split(":", 1)[1][:1]:  # "general" and Danbooru's "g" alike
                return False
        elif term.startswith("score:"):
            value = term.split(":", 1)[1]
            op = value.rstrip("0123456789-")
            number = int(value[len(op):])
            ok = {">=": post.score >= number, "<=": post.score <= number, ">": post.score > number,
                  "<": post.score < number, "": post.score == number, "=": post.score == number}[op]  # fmt: skip
            if not ok:
                return False
        elif term.startswith("id:<"):
            if not post.id < int(term[4:]):
                return False
        elif term.startswith(("sort:", "order:")):
            continue
        elif term not in post.tags:
            return False
    return True


class BooruServer(ThreadingHTTPServer):
    daemon_threads = True  # a "slow" reply still sleeping must not hold up shutdown

    def __init__(self, posts: list[FakePost], faults: Faults | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.posts = list(posts)
        self.faults = faults or Faults()
        self.credentials: tuple[str, str] | None = None  # (api_key, user_id) that Gelbooru requires
        self.danbooru_login: tuple[str, str] | None = None  # (login, api_key) Danbooru accepts
        self.deep_limit = 20000  # Gelbooru: pid * limit beyond this answers "Too deep!"
        self.duplicates = False  # each page after the first repeats the previous page's last post
        self.count_unknown = False  # Danbooru counts answer null
        self.slow_seconds = 1.0
        self.image_delay = 0.0
        self.requests: list[tuple[str, dict]] = []  # (path, query parameters)
        self._active = 0
        self.max_active_images = 0
        self._lock = threading.Lock()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def base(self, booru: str) -> str:
        """The API base URL to give the client for `booru`."""
        return f"{self.root}/{booru}"

    def post(self, post_id: int) -> FakePost:
        return next(p for p in self.posts if p.id == post_id)

    def requested(self, path_part: str) -> list[tuple[str, dict]]:
        return [r for r in self.requests if path_part in r[0]]

    def handle_error(self, request, client_address):
        pass  # clients that time out leave broken pipes behind; that is the point of those tests

    def matching(self, tags: str) -> list[FakePost]:
        terms = tags.split()
        return sorted((p for p in self.posts if _matches(p, terms)), key=lambda p: -p.id)

    def page(self, tags: str, offset: int, limit: int) -> list[FakePost]:
        found = self.matching(tags)
        if self.duplicates and offset > 0:
            offset -= 1
        page = found[offset : offset + limit]
        cursor = next((t for t in tags.split() if t.startswith("id:<")), None)
        if self.duplicates and cursor:  # the id cursor's own post shows up again
            again = [p for p in self.posts if p.id == int(cursor[4:])]
            page = again + page
        return page


class _Handler(BaseHTTPRequestHandler):
    server: BooruServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlparse(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.server.requests.append((url.path, params))
        parts = url.path.strip("/").split("/")
        booru = parts[0]
        if len(parts) >= 4 and parts[1] in ("images", "samples"):
            return self._file(int(parts[2]), parts[1] == "samples")
        fault = self.server.faults.take("api")
        if self._fault(fault):
            return
        if booru in ("gelbooru", "safebooru") and parts[1:] == ["index.php"]:
            return self._dapi(booru, params)
        if booru == "danbooru" and parts[1:] == ["posts.json"]:
            return self._danbooru_posts(params)
        if booru == "danbooru" and parts[1:] == ["counts", "posts.json"]:
            return self._danbooru_count(params)
        self._send(404, b"not found", "text/plain")

    # -- plumbing --

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _fault(self, fault) -> bool:
        """Act out `fault`; True when the reply has been sent (or deliberately not)."""
        if fault is None:
            return False
        if isinstance(fault, int):
            headers = {"Retry-After": "0"} if fault == 429 else {}
            self._send(fault, b"<html><body>error</body></html>", "text/html", headers)
            return True
        if fault == "slow":
            time.sleep(self.server.slow_seconds)
            return False
        if fault == "html":
            self._send(200, HTML_PAGE, "text/html")
            return True
        return False

    # -- files --

    def _file(self, post_id: int, sample: bool) -> None:
        with self.server._lock:
            self.server._active += 1
            self.server.max_active_images = max(self.server.max_active_images, self.server._active)
        try:
            if self.server.image_delay:
                time.sleep(self.server.image_delay)
            fault = self.server.faults.take(f"image:{post_id}", "image")
            if self._fault(fault):
                return
            post = next((p for p in self.server.posts if p.id == post_id), None)
            body = None if post is None else (post.sample if sample else post.data)
            if body is None:
                return self._send(404, b"no such file", "text/plain")
            ctype = "image/png" if body.startswith(b"\x89PNG") else "application/octet-stream"
            if fault == "truncated":
                return self._send(200, body[: len(body) // 2], ctype)
            if fault == "cut":  # promise the whole body, send half, hang up
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(200, body, ctype)
        finally:
            with self.server._lock:
                self.server._active -= 1

    def _file_url(self, booru: str, post: FakePost) -> str:
        if post.file_url:
            return post.file_url
        return f"{self.server.base(booru)}/images/{post.id}/{quote(post.name, safe='')}"

    def _sample_url(self, booru: str, post: FakePost) -> str:
        return f"{self.server.base(booru)}/samples/{post.id}/sample_{post.id}.jpg" if post.sample else ""

    # -- Gelbooru / Safebooru --

    def _dapi(self, booru: str, params: dict) -> None:
        if booru == "gelbooru" and self.server.credentials is not None:
            if (params.get("api_key"), params.get("user_id")) != self.server.credentials:
                return self._send(401, b"[]", "application/json")
        tags = params.get("tags", "")
        limit = int(params.get("limit", 100))
        offset = int(params.get("pid", 0)) * limit
        if booru == "gelbooru" and offset > self.server.deep_limit:
            return self._send(200, b"Too deep! Pull it back some. Holy fuck.", "text/html")
        if booru == "safebooru" and params.get("json") != "1":
            count = len(self.server.matching(tags))
            xml = f'<?xml version="1.0" encoding="UTF-8"?><posts count="{count}" offset="0"></posts>'
            return self._send(200, xml.encode(), "text/xml")
        page = self.server.page(tags, offset, limit)
        if booru == "safebooru":
            if not page:
                return self._send(200, b"", "application/json")  # its answer to "no results"
            return self._json([self._safebooru_post(p) for p in page])
        answer: dict = {"@attributes": {"limit": limit, "offset": offset, "count": len(self.server.matching(tags))}}
        if page:
            posts = [self._gelbooru_post(p) for p in page]
            answer["post"] = posts[0] if len(posts) == 1 else posts
        self._json(answer)

    def _gelbooru_post(self, p: FakePost) -> dict:
        return {
            "id": p.id, "md5": p.md5, "width": p.width, "height": p.height, "rating": p.rating,
            "score": p.score, "source": p.source, "image": p.name, "directory": str(p.id),
            "tags": html.escape(" ".join(p.tags)), "file_url": self._file_url("gelbooru", p),
            "sample_url": self._sample_url("gelbooru", p),
        }  # fmt: skip

    def _safebooru_post(self, p: FakePost) -> dict:
        # No file_url or sample_url: the client builds them from directory/image like on the site.
        return {
            "id": p.id, "hash": p.md5, "width": p.width, "height": p.height, "rating": p.rating,
            "score": None, "image": p.name, "directory": str(p.id), "sample": p.sample is not None,
            "tags": html.escape(" ".join(p.tags)), "owner": "someone", "parent_id": 0,
        }  # fmt: skip

    # -- Danbooru --

    def _danbooru_refusal(self, params: dict) -> bool:
        given = (params.get("login"), params.get("api_key"))
        if given != (None, None) and given != self.server.danbooru_login:
            self._json({"success": False, "message": "Invalid API key"}, 401)
            return True
        if given == (None, None) and len(params.get("tags", "").split()) > 2:
            self._json({"success": False, "message": "You cannot search for more than 2 tags at a time."}, 422)
            return True
        return False

    def _danbooru_posts(self, params: dict) -> None:
        if self._danbooru_refusal(params):
            return
        tags = params.get("tags", "")
        limit = int(params.get("limit", 20))
        page = params.get("page", "")
        if page.startswith("b"):
            found = self.server.page(f"{tags} id:<{page[1:]}", 0, limit)
        else:
            found = self.server.page(tags, (int(page or 1) - 1) * limit, limit)
        self._json([self._danbooru_post(p) for p in found])

    def _danbooru_post(self, p: FakePost) -> dict:
        post = {
            "id": p.id, "image_width": p.width, "image_height": p.height, "file_ext": p.ext.lstrip("."),
            "tag_string": " ".join(p.tags), "rating": p.rating[:1], "score": p.score, "source": p.source,
            "is_deleted": p.deleted,
            "tag_string_general": " ".join(t for t in p.tags if not t.startswith(("char_", "artist_"))),
            "tag_string_character": " ".join(t for t in p.tags if t.startswith("char_")),
            "tag_string_artist": " ".join(t for t in p.tags if t.startswith("artist_")),
            "tag_string_copyright": "", "tag_string_meta": "",
        }  # fmt: skip
        if not p.hidden:
            post["md5"] = p.md5
            post["file_url"] = self._file_url("danbooru", p)
            post["large_file_url"] = self._sample_url("danbooru", p) or post["file_url"]
        return post

    def _danbooru_count(self, params: dict) -> None:
        if self._danbooru_refusal(params):
            return
        count = None if self.server.count_unknown else len(self.server.matching(params.get("tags", "")))
        self._json({"counts": {"posts": count}})


@contextlib.contextmanager
def serve_booru(posts: list[FakePost] | None = None, faults: Faults | None = None):
    """A running BooruServer on 127.0.0.1 (an ephemeral port) for the `with` block."""
    server = BooruServer(posts if posts is not None else make_posts(6), faults)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def booru_server():
    """A fake booru with six plain posts (ids 100-105); tests change `.posts`, `.faults` and options."""
    with serve_booru() as server:
        yield server


@pytest.fixture
def no_booru_credentials(monkeypatch):
    """Keep a developer's own booru credentials (environment) out of the tests."""
    for booru in ("GELBOORU", "SAFEBOORU", "DANBOORU"):
        for what in ("API_KEY", "USER_ID"):
            monkeypatch.delenv(f"LORA_MAKER_{booru}_{what}", raising=False)
