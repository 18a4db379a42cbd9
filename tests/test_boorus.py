"""Booru clients against the fake boorus of booru_server.py on 127.0.0.1: paging, fields, query
pass-through, credentials and every fault the server can inject."""

from __future__ import annotations

import time

import pytest
from booru_server import (  # noqa: F401 (no_booru_credentials is a fixture)
    FakePost,
    animated_gif_post,
    fast_http,
    make_image,
    make_posts,
    no_booru_credentials,
    serve_booru,
    video_post,
)

from lora_trainer_ext import paths
from lora_trainer_ext.dataset.boorus import BOORUS, Danbooru, Gelbooru, Post, Safebooru, credentials, make_client
from lora_trainer_ext.dataset.http import HttpError
from lora_trainer_ext.errors import LoraMakerError

pytestmark = [pytest.mark.usefixtures("no_booru_credentials"), pytest.mark.timeout(60)]


def client(server, name: str, page_size: int | None = None, **kwargs):
    c = make_client(name, api_url=server.base(name), http=kwargs.pop("http", None) or fast_http(), **kwargs)
    if page_size:
        c.page_size = page_size
    return c


def ids(posts) -> list[int]:
    return [p.id for p in posts]


# -- paging ------------------------------------------------------------------------------------------


def test_gelbooru_pages_newest_first_with_the_id_cursor():
    with serve_booru(make_posts(8)) as server:
        gel = client(server, "gelbooru", page_size=3)
        assert ids(gel.posts("1girl")) == list(range(107, 99, -1))
        listing = server.requested("/gelbooru/index.php")
        # Never a deep pid: every page is pid 0 with "id:<lowest so far".
        assert {r[1]["pid"] for r in listing} == {"0"}
        assert [r[1]["tags"] for r in listing] == ["1girl", "1girl id:<105", "1girl id:<102", "1girl id:<100"]
        before = len(server.requests)
        assert ids(gel.posts("1girl", limit=4)) == [107, 106, 105, 104]
        assert len(server.requests) - before == 2  # no page fetched beyond the limit


def test_gelbooru_sort_query_pages_by_number_and_stops_at_the_depth_cap():
    with serve_booru(make_posts(10)) as server:
        gel = client(server, "gelbooru", page_size=3)
        gel.DEEP_LIMIT = 6
        assert len(list(gel.posts("1girl sort:score"))) == 6
        assert [r[1]["pid"] for r in server.requested("/gelbooru/index.php")] == ["0", "1"]
        assert "first 6 posts" in gel.notes[0]

        # The server's own "Too deep!" (HTTP 200, not JSON) ends the listing with a note, not an error.
        server.deep_limit = 3
        gel.DEEP_LIMIT = 20000
        assert len(list(gel.posts("1girl sort:score"))) == 6
        assert "stopped there" in gel.notes[0]


def test_safebooru_pages_by_number_and_empty_body_means_no_results():
    with serve_booru(make_posts(5)) as server:
        safe = client(server, "safebooru", page_size=2)
        assert ids(safe.posts("solo")) == [104, 103, 102, 101, 100]
        assert [r[1]["pid"] for r in server.requested("/safebooru/index.php")] == ["0", "1", "2", "3"]
        assert safe.count("solo") == 5
        assert list(safe.posts("no_such_tag")) == []
        assert safe.count("no_such_tag") == 0


def test_danbooru_pages_with_the_before_id_cursor():
    with serve_booru(make_posts(5)) as server:
        dan = client(server, "danbooru", page_size=2)
        assert ids(dan.posts("solo")) == [104, 103, 102, 101, 100]
        pages = [r[1].get("page") for r in server.requested("/danbooru/posts.json")]
        assert pages == [None, "b103", "b101", "b100"]
        assert dan.count("solo") == 5
        server.count_unknown = True
        assert dan.count("solo") is None


@pytest.mark.parametrize("name", BOORUS)
def test_duplicate_posts_across_pages_are_listed_and_paging_still_ends(name):
    with serve_booru(make_posts(7)) as server:
        server.duplicates = True
        listed = ids(client(server, name, page_size=3).posts("1girl"))
        assert set(listed) == set(range(100, 107))
        assert len(listed) > 7  # the repeats come through; the scraper's plan drops them


# -- what a post carries -----------------------------------------------------------------------------


def test_gelbooru_post_fields_and_single_post_answers():
    tags = ["rock_&_roll", "d'arby", "1girl"]
    post = FakePost(7, make_image(7), ".jpg", tags, rating="sensitive", score=12, source="http://127.0.0.1/art/7")
    with serve_booru([post]) as server:
        gel = client(server, "gelbooru")
        (got,) = gel.posts("1girl")  # the API answers a lone post as an object, not a list
        assert got.tags == ["rock_&_roll", "d'arby", "1girl"]  # HTML entities undone
        assert (got.id, got.width, got.height, got.ext, got.md5) == (7, 32, 24, ".jpg", post.md5)
        assert (got.rating, got.score, got.source) == ("sensitive", 12, "http://127.0.0.1/art/7")
        assert got.file_url.startswith(server.base("gelbooru") + "/images/7/")
        assert got.sample_url == ""
        assert got.page_url.endswith("page=post&s=view&id=7")
        assert gel.count("1girl") == 1
        assert list(gel.posts("nothing_here")) == [] and gel.count("nothing_here") == 0


def test_safebooru_builds_file_and_sample_urls_from_directory_and_image():
    post = FakePost(9, make_image(9), ".jpg", ["solo"], name="abc.jpeg", sample=make_image(90))
    with serve_booru([post]) as server:
        (got,) = client(server, "safebooru").posts("solo")
        assert got.file_url == f"{server.base('safebooru')}/images/9/abc.jpeg"
        assert got.sample_url == f"{server.base('safebooru')}/samples/9/sample_abc.jpg"
        assert got.ext == ".jpeg" and got.md5 == post.md5 and got.score is None


def test_server_file_name_is_never_trusted_as_a_path():
    post = FakePost(5, make_image(5, "PNG"), ".png", ["solo"], name="../../evil.png")
    with serve_booru([post]) as server:
        for name in ("gelbooru", "safebooru"):
            (got,) = client(server, name).posts("solo")
            assert got.ext == ".png"
            assert "/images/5/" in got.file_url and "../" not in got.file_url


@pytest.mark.parametrize("name", ["gelbooru", "danbooru"])
def test_file_urls_are_made_absolute_and_only_http_is_fetched(name):
    posts = [
        FakePost(3, make_image(3), ".jpg", file_url="file:///etc/passwd"),
        FakePost(2, make_image(2), ".jpg", file_url=f"/{name}/images/2/b.jpg"),
        FakePost(1, make_image(1), ".jpg", file_url="//127.0.0.1:1/images/1/c.jpg"),
    ]
    with serve_booru(posts) as server:
        local, relative, protocol_relative = client(server, name).posts("solo")
        assert local.file_url == ""  # treated like a hidden file: the scraper skips it
        assert relative.file_url == f"{server.base(name)}/images/2/b.jpg"
        assert protocol_relative.file_url == "http://127.0.0.1:1/images/1/c.jpg"


def test_danbooru_post_fields_hidden_and_deleted_posts():
    posts = [
        FakePost(3, make_image(3), ".jpg", ["char_alice", "artist_bob", "smile"], rating="questionable", score=4),
        FakePost(2, make_image(2), ".jpg", ["smile"], hidden=True),
        FakePost(1, make_image(1), ".jpg", ["smile"], deleted=True),
    ]
    with serve_booru(posts) as server:
        alice, hidden, deleted = client(server, "danbooru").posts("smile")
        assert alice.tags_by_category["character"] == ["char_alice"]
        assert alice.tags_by_category["artist"] == ["artist_bob"]
        assert alice.tags_by_category["general"] == ["smile"]
        assert (alice.rating, alice.score, alice.ext, alice.md5) == ("questionable", 4, ".jpg", posts[0].md5)
        assert alice.page_url == f"{server.base('danbooru')}/posts/3"
        assert hidden.file_url == "" and hidden.md5 == ""
        assert deleted.deleted and not alice.deleted


def test_animated_posts_are_recognised_from_file_type_or_tags():
    still_gif = FakePost(1, make_image(1, "GIF"), ".gif", ["1girl"])
    with serve_booru([video_post(3), animated_gif_post(2), still_gif]) as server:
        video, gif, still_gif = client(server, "gelbooru").posts("1girl")
        assert video.animated and video.ext == ".webm"
        assert gif.animated
        assert not still_gif.animated  # a .gif without animation tags is left to the image check
    assert Post("x", 1, "u", ext=".zip").animated  # a Danbooru ugoira


# -- queries -----------------------------------------------------------------------------------------


def test_query_filters_pass_through_and_whitespace_is_normalised():
    posts = [
        FakePost(4, make_image(4), ".jpg", ["1girl"], rating="general", score=10),
        FakePost(3, make_image(3), ".jpg", ["1girl", "solo"], rating="general", score=10),
        FakePost(2, make_image(2), ".jpg", ["1girl"], rating="explicit", score=10),
        FakePost(1, make_image(1), ".jpg", ["1girl"], rating="general", score=2),
    ]
    with serve_booru(posts) as server:
        gel = client(server, "gelbooru")
        assert ids(gel.posts("  1girl\t -solo  rating:general score:>=5 ")) == [4]
        assert server.requests[0][1]["tags"] == "1girl -solo rating:general score:>=5"
        assert "tags=1girl+-solo" in gel.browse_url("1girl  -solo")
        for empty in ("", "   ", []):
            with pytest.raises(LoraMakerError, match="empty"):
                list(gel.posts(empty))


def test_make_client_knows_the_three_boorus():
    assert [type(make_client(n)) for n in BOORUS] == [Gelbooru, Safebooru, Danbooru]
    assert isinstance(make_client(" Danbooru "), Danbooru)
    with pytest.raises(LoraMakerError, match="unknown booru"):
        make_client("e621")


# -- credentials -------------------------------------------------------------------------------------


def test_gelbooru_401_says_where_to_get_credentials_and_how_to_pass_them(monkeypatch):
    with serve_booru(make_posts(2)) as server:
        server.credentials = ("secret", "42")
        with pytest.raises(LoraMakerError) as refused:
            client(server, "gelbooru").count("1girl")
        message = str(refused.value)
        assert "HTTP 401" in message and "index.php?page=account&s=options" in message  # where to get them
        for how in ("--api-key", "--user-id", "LORA_MAKER_GELBOORU_API_KEY", "LORA_MAKER_GELBOORU_USER_ID"):
            assert how in message

        with pytest.raises(LoraMakerError, match="rejected the credentials"):
            list(client(server, "gelbooru", api_key="wrong", user_id="42").posts("1girl"))

        assert client(server, "gelbooru", api_key="secret", user_id="42").count("1girl") == 2
        monkeypatch.setenv("LORA_MAKER_GELBOORU_API_KEY", "secret")
        monkeypatch.setenv("LORA_MAKER_GELBOORU_USER_ID", "42")
        assert len(list(client(server, "gelbooru").posts("1girl"))) == 2
        assert server.requests[-1][1]["api_key"] == "secret" and server.requests[-1][1]["user_id"] == "42"


def test_credentials_come_from_the_environment_before_webui_settings(monkeypatch):
    settings = {"lora_maker_danbooru_api_key": "from-settings", "lora_maker_danbooru_user_id": "alice"}
    monkeypatch.setattr(paths, "webui_settings", lambda: settings)
    assert credentials("danbooru") == ("from-settings", "alice")
    monkeypatch.setenv("LORA_MAKER_DANBOORU_API_KEY", "from-env")
    assert credentials("danbooru") == ("from-env", "alice")
    assert credentials("gelbooru") == ("", "")


def test_danbooru_login_and_the_two_tag_limit():
    with serve_booru(make_posts(3)) as server:
        server.danbooru_login = ("alice", "key")
        with pytest.raises(LoraMakerError) as refused:
            client(server, "danbooru").count("1girl solo rating:general")
        message = str(refused.value)
        assert "You cannot search for more than 2 tags at a time" in message
        assert "fewer tags" in message and "LORA_MAKER_DANBOORU_API_KEY" in message

        logged_in = client(server, "danbooru", api_key="key", user_id="alice")
        assert logged_in.count("1girl solo rating:general") == 3
        assert server.requests[-1][1]["login"] == "alice" and server.requests[-1][1]["api_key"] == "key"
        with pytest.raises(LoraMakerError, match="rejected the credentials.*HTTP 401"):
            list(client(server, "danbooru", api_key="bad", user_id="alice").posts("solo"))


# -- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BOORUS)
def test_429_then_success(name):
    with serve_booru(make_posts(3)) as server:
        server.faults.add("api", 429, times=2)
        assert len(list(client(server, name).posts("1girl"))) == 3
        assert len(server.requests) >= 4  # two refusals, then the pages


def test_500s_are_retried_then_reported_with_the_booru_name():
    with serve_booru(make_posts(3)) as server:
        server.faults.add("api", 500, times=2)
        assert client(server, "gelbooru").count("1girl") == 3
        server.faults.add("api", 503, times=None)
        with pytest.raises(HttpError) as failed:
            client(server, "gelbooru", http=fast_http(retries=2)).count("1girl")
        assert failed.value.status == 503 and str(failed.value).startswith("Gelbooru: ")


def test_slow_reply_is_retried_and_a_dead_server_is_a_clear_error():
    with serve_booru(make_posts(2)) as server:
        server.faults.add("api", "slow", times=1)
        assert client(server, "danbooru").count("1girl") == 2
        server.faults.add("api", "slow", times=None)
        started = time.monotonic()
        with pytest.raises(HttpError, match="no answer"):
            client(server, "danbooru", http=fast_http(retries=1)).count("1girl")
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("name", BOORUS)
def test_html_instead_of_json_is_a_clear_error(name):
    with serve_booru(make_posts(2)) as server:
        server.faults.add("api", "html", times=None)
        c = client(server, name)
        for call in (lambda: c.count("1girl"), lambda: list(c.posts("1girl"))):
            with pytest.raises(LoraMakerError) as failed:
                call()
            assert not isinstance(failed.value, ValueError)  # not a JSONDecodeError leaking out
            message = str(failed.value)
            assert message.startswith(c.title) and 'an HTML page "Just a moment..."' in message
