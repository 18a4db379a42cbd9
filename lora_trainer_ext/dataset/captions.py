"""Caption text <-> tag lists, and the tag spelling rules shared by the tagger, the scraper and curation.

A caption is comma-separated tags ("1girl, blue eyes, smile") or a sentence for photos. Tags are
compared by `tag_key`, so `blue_eyes`, `Blue Eyes` and `blue eyes` are one tag and `name \\(series\\)`
matches `name (series)`; files keep the spelling the user or the tagger chose.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LoraMakerError

# Faces whose underscores are part of the tag (the list the WD tagger's reference app keeps).
EMOTICONS = frozenset(
    "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split()
)
# Booru bookkeeping tags: they describe the upload (its size, translation, missing information), not
# the picture, so they make poor caption tags; booru scrapes drop them and the tagger's default
# blacklist holds them. Quality and style tags (lowres, official_art, monochrome) stay: they do
# describe the image, and prompts can ask them away.
META_TAGS = frozenset(
    "highres absurdres incredibly_absurdres commentary commentary_request english_commentary "
    "symbol-only_commentary translated translation_request partially_translated check_translation tagme "
    "artist_request character_request copyright_request source_request bad_id bad_pixiv_id bad_twitter_id "
    "md5_mismatch duplicate revision".split()
)
_SPACES = re.compile(r"\s+")
_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")


def _is_emoticon(tag: str) -> bool:
    return tag in EMOTICONS or len(tag) <= 3 and "_" in tag


def split_tags(text: str | None) -> list[str]:
    if not text:
        return []
    return [t.strip() for t in re.split(r"[,\n]", text) if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def tag_key(tag: str) -> str:
    """The identity of a tag: case, underscores, escaping and spacing don't matter."""
    tag = tag.strip().replace("\\(", "(").replace("\\)", ")").lower()
    if not _is_emoticon(tag):
        tag = tag.replace("_", " ")
    return _SPACES.sub(" ", tag)


def format_tag(name: str, underscores_to_spaces: bool = True, escape_parentheses: bool = True) -> str:
    """A booru/tagger tag name as it should appear in a caption (and a prompt)."""
    tag = name.strip()
    if underscores_to_spaces and not _is_emoticon(tag):
        tag = tag.replace("_", " ")
    if escape_parentheses:
        tag = _UNESCAPED_PAREN.sub(r"\\\1", tag)
    return tag


def read_text(path: Path) -> str | None:
    """A caption (or other small text file) as stored, None when missing; a BOM is tolerated."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise LoraMakerError(f"{Path(path).name} is not UTF-8 text; re-save it as UTF-8") from e


def read_caption(image: Path) -> str | None:
    text = read_text(Path(image).with_suffix(".txt"))
    return None if text is None else text.strip()
