"""Http against scripted loopback servers: what is retried, how long it waits, and what fails at once."""

from __future__ import annotations

import datetime
import email.utils
import http.server
import threading

import pytest
from booru_server import fast_http

from lora_trainer_ext.dataset.http import Http, HttpError, _retry_after
from lora_trainer_ext.errors import Stopped


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://127.0.0.1:notaport/x", "127.0.0.1/no-scheme"])
def test_unusable_urls_fail_at_once_with_an_http_error(url):
    http = fast_http()
    with pytest.raises(HttpError, match="cannot fetch"):
        http.get(url)
    with pytest.raises(HttpError, match="cannot fetch"):
        http.get_bytes(url)



class _Script(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of the server's script."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        status, headers, body = self.server.script.pop(0) if self.server.script else (200, {}, b"done")
        self.server.seen.append(self.headers.get("Range"))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    server.script, server.seen = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_retry_after_overrides_the_backoff(scripted):
    # a 30 s backoff would hit the pytest timeout: only the server's Retry-After: 0 lets this pass
    scripted.script = [(429, {"Retry-After": "0"}, b"slow down"), (503, {"Retry-After": "0"}, b"busy")]
    http_client = Http(backoff=30, max_wait=60, timeout=(2, 2))
    assert http_client.get_bytes(f"http://127.0.0.1:{scripted.server_port}/x") == b"done"
    assert len(scripted.seen) == 3


@pytest.mark.timeout(20)
def test_stop_interrupts_a_backoff(scripted):
    scripted.script = [(500, {}, b"oops")] * 3
    # the user presses Stop once the first answer (a 500) is in: the 30 s backoff must not be sat out
    http_client = Http(backoff=30, timeout=(2, 2), should_stop=lambda: len(scripted.seen) > 0)
    with pytest.raises(Stopped):
        http_client.get(f"http://127.0.0.1:{scripted.server_port}/x")
    assert len(scripted.seen) == 1  # gave up waiting, never asked again


def test_errors_that_retrying_cannot_fix_are_not_retried(scripted):
    scripted.script = [(404, {}, b"no such post")]
    with pytest.raises(HttpError) as caught:
        Http(backoff=30).get(f"http://127.0.0.1:{scripted.server_port}/x")
    assert caught.value.status == 404 and caught.value.body == "no such post" and len(scripted.seen) == 1


def test_retry_after_forms():
    import requests

    def answer(value):
        response = requests.Response()
        response.headers["Retry-After"] = value
        return _retry_after(response)

    assert answer("7") == 7.0
    soon = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30))
    assert 20 < answer(soon) <= 30
    assert answer("whenever") is None
