"""HTTP for boorus and model downloads: one identifying User-Agent, timeouts, retries with backoff on
429/5xx, timeouts and dropped connections (honouring Retry-After), and resumable file downloads.

Waits poll `should_stop`, so the user's Stop button interrupts a backoff as well as a transfer."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path
from typing import Callable

import requests

from .. import __version__
from ..errors import LoraMakerError, Stopped

USER_AGENT = f"LoRA-Maker/{__version__} (AUTOMATIC1111 WebUI extension; dataset builder)"
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524}
_CHUNK = 1 << 16


class HttpError(LoraMakerError):
    """A request that failed for good; `status` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Http:
    def __init__(
        self,
        retries: int = 5,
        backoff: float = 1.0,
        max_wait: float = 60.0,
        timeout: tuple[float, float] = (10.0, 60.0),
        should_stop: Callable[[], bool] = lambda: False,
    ):
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.timeout = timeout
        self.should_stop = should_stop
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + min(seconds, self.max_wait)
        while (left := end - time.monotonic()) > 0:
            if self.should_stop():
                raise Stopped("stopped by the user")
            time.sleep(min(left, 0.2))

    def _wait(self, attempt: int, response: requests.Response | None = None) -> None:
        hinted = _retry_after(response) if response is not None else None
        self._sleep(hinted if hinted is not None else self.backoff * 2**attempt)

    def get(self, url: str, params: dict | None = None, headers: dict | None = None, stream: bool = False) -> requests.Response:
        """A successful (2xx) response, retrying transient failures; otherwise HttpError."""
        for attempt in range(self.retries + 1):
            if self.should_stop():
                raise Stopped("stopped by the user")
            last = attempt == self.retries
            try:
                response = self.session.get(url, params=params, headers=headers, timeout=self.timeout, stream=stream)
            except (requests.ConnectionError, requests.Timeout) as e:
                if last:
                    raise HttpError(f"no answer from {_host(url)} after {attempt + 1} tries: {type(e).__name__}") from e
                self._wait(attempt)
                continue
            except requests.RequestException as e:  # a malformed or unsupported URL: retrying can't help
                raise HttpError(f"cannot fetch {url!r}: {e}") from e
            if response.ok:
                return response
            if response.status_code in RETRY_STATUSES and not last:
                response.close()
                self._wait(attempt, response)
                continue
            body = "" if stream else response.text[:500]
            response.close()  # a streamed answer holds its connection until closed
            raise HttpError(f"{_host(url)} answered HTTP {response.status_code} {response.reason}", response.status_code, body)
        raise AssertionError("unreachable")

    def get_bytes(self, url: str, params: dict | None = None) -> bytes:
        """The whole body, retrying when the connection drops mid-transfer or the body is short."""
        for attempt in range(self.retries + 1):
            response = self.get(url, params=params, stream=True)
            try:
                data = response.content
                expected = response.headers.get("Content-Length")
                if expected is not None and "Content-Encoding" not in response.headers and len(data) != int(expected):
                    raise requests.exceptions.ChunkedEncodingError(f"got {len(data)} of {expected} bytes")
                return data
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if attempt == self.retries:
                    raise HttpError(f"download from {_host(url)} kept breaking off: {e}") from e
                self._wait(attempt)
            finally:
                response.close()
        raise AssertionError("unreachable")

    def download(
        self,
        url: str,
        dest: Path,
        on_bytes: Callable[[int, int | None], None] | None = None,
        headers: dict | None = None,
    ) -> Path:
        """Fetch `url` into `dest` through `dest.part`, resuming a partial file with a Range request
        (after a dropped connection now or an interrupted run before) and renaming only when complete.
        `on_bytes(done, total)` reports progress; `headers` go with every request (e.g. Authorization)."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            try:
                response = self.get(url, headers={**(headers or {}), **({"Range": f"bytes={have}-"} if have else {})}, stream=True)
            except HttpError as e:
                if e.status != 416 or not have or attempt == self.retries:
                    raise
                # The partial file is no prefix of what the server has now (it changed, or the .part
                # was already whole when a run stopped before the rename): start over.
                part.unlink()
                continue
            try:
                if response.status_code != 206:
                    have = 0  # the server ignored the range: start over
                total = _total_size(response, have)
                with open(part, "ab" if have else "wb") as f:
                    for chunk in response.iter_content(_CHUNK):
                        if self.should_stop():
                            raise Stopped("stopped by the user (the partial download is kept and resumes next time)")
                        f.write(chunk)
                        have += len(chunk)
                        if on_bytes:
                            on_bytes(have, total)
                if total is not None and have != total:
                    raise requests.exceptions.ChunkedEncodingError(f"got {have} of {total} bytes")
                part.replace(dest)
                return dest
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if attempt == self.retries:
                    raise HttpError(f"download of {url} kept breaking off ({e}); run again to resume") from e
                self._wait(attempt)
            finally:
                response.close()
        raise AssertionError("unreachable")


def _total_size(response: requests.Response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() and "Content-Encoding" not in response.headers else None


def _host(url: str) -> str:
    return requests.utils.urlparse(url).netloc or url
