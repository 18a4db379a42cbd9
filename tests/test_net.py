"""Http failures that retrying can't fix are HttpErrors (a LoraMakerError), not raw requests errors."""

from __future__ import annotations

import pytest
from booru_server import fast_http

from lora_trainer_ext.net import HttpError


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://127.0.0.1:notaport/x", "127.0.0.1/no-scheme"])
def test_unusable_urls_fail_at_once_with_an_http_error(url):
    http = fast_http()
    with pytest.raises(HttpError, match="cannot fetch"):
        http.get(url)
    with pytest.raises(HttpError, match="cannot fetch"):
        http.get_bytes(url)

