"""The API's request bodies (pydantic 1, the WebUI's) and their conversions."""

from __future__ import annotations

from dataclasses import fields, replace

from pydantic import BaseModel, validator

from ..dataset.captions import split_tags
from ..dataset.dedupe import DEFAULT_THRESHOLD
from ..errors import LoraMakerError
from ..grids.plan import RenderSettings, parse_weights


def _tag_list(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [tag for item in items for tag in split_tags(str(item))]


class NewProject(BaseModel):
    name: str


class ScrapeQuery(BaseModel):
    booru: str
    tags: str
    limit: int | None = None
    api_url: str | None = None
    api_key: str = ""
    user_id: str = ""


class ScrapeRequest(ScrapeQuery):
    save_tags: bool = True
    workers: int = 4


class DedupeRequest(BaseModel):
    threshold: int = DEFAULT_THRESHOLD
    apply: bool = False


class TagRequest(BaseModel):
    tagger: str | None = None  # hub repo id or local folder
    threshold: float | None = None
    character_threshold: float | None = None
    existing: str | None = None
    ratings: bool | None = None
    blacklist: list[str] | None = None
    batch_size: int | None = None

    _tags = validator("blacklist", pre=True, allow_reuse=True)(lambda v: None if v is None else _tag_list(v))


class TagEdit(BaseModel):
    activation: list[str] = []
    remove: list[str] = []
    replace: list[str] = []  # "old1, old2 => new"
    add: list[str] = []
    dedupe: bool = False
    sort: bool = False
    include: list[str] = []
    exclude: list[str] = []
    any: bool = False

    _tags = validator("activation", "remove", "add", "include", "exclude", pre=True, allow_reuse=True)(_tag_list)
    _specs = validator("replace", pre=True, allow_reuse=True)(lambda v: [v] if isinstance(v, str) else v)


class Caption(BaseModel):
    caption: str


class TrainRequest(BaseModel):
    settings: dict = {}
    resume: bool = False
    restart: bool = False  # start over, discarding a stopped run


class StopRequest(BaseModel):
    save: bool = False


class GridRequest(BaseModel):
    epochs: str = "all"  # grid_plan.EPOCH_MODES
    k: int = 2
    chosen: list[int] = []
    weights: list[float] | None = None
    prompts: list[tuple[str, str]] | None = None
    seeds: list[int] = []
    negative: str = ""
    settings: dict = {}

    _weights = validator("weights", pre=True, allow_reuse=True)(lambda v: parse_weights(v) if isinstance(v, str) else v)


class UseEpoch(BaseModel):
    epoch: int
    weight: float


def render_settings(base: RenderSettings, given: dict) -> RenderSettings:
    """`base` with the `given` settings, each converted to its field's type (a whole number where one
    is expected), unknown keys refused."""
    kinds = {f.name: type(getattr(base, f.name)) for f in fields(RenderSettings)}
    unknown = sorted(set(given) - set(kinds))
    if unknown:
        raise LoraMakerError(f"unknown render settings {', '.join(unknown)}: use {', '.join(kinds)}")
    values = {}
    for key, value in given.items():
        kind = kinds[key]
        try:
            values[key] = kind(value)
            if kind is int and (isinstance(value, bool) or float(value) != values[key]):
                raise ValueError(value)
        except (TypeError, ValueError):
            expected = {int: "a whole number", float: "a number"}.get(kind, "text")
            raise LoraMakerError(f"render setting {key} must be {expected}, got {value!r}") from None
    return replace(base, **values)
