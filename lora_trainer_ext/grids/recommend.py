"""Pick an epoch and a weight from a scored grid, and say why in the guide's words.

The rule, deterministic. Scores are first pooled per (epoch, weight) over the layers (prompts and
seeds): likeness and flexibility are averaged, overcooking is the worst layer's (a broken image
counts as overcooked 1). Weight 0 (no LoRA) gives only the reference flexibility. Then per epoch,
over its LoRA weights:
  * usable weights: overcooking below OVERCOOKED;
  * liked weights: usable ones with likeness of at least LIKE_OK (all usable ones when likeness is
    unknown, e.g. no core tags);
  * "overcooked": fewer than half of its weights are usable (clipping, artefacts, NaN/black images);
  * else "undercooked": no liked weight (the core tags show at no weight: the LoRA has too little
    effect yet);
  * else "overfit": its flexibility (mean over the liked weights) is below FLEX_KEEP of the reference,
    the best of the no-LoRA baseline and every earlier epoch: likeness holds but the LoRA no longer
    follows prompts that leave the dataset;
  * else "good".
The recommendation is the liked weight of a good epoch with the highest merit (mean of likeness and
flexibility, times 1 - overcooking), merits compared to two decimals; ties go to the earlier epoch,
then to the weight nearest PREFERRED_WEIGHT. Without a good epoch, the best-merit cell among all
unbroken LoRA cells is offered with the advice that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .plan import format_weight
from .scoring import Score

LIKE_OK = 0.6
OVERCOOKED = 0.5
FLEX_KEEP = 0.5
PREFERRED_WEIGHT = 0.8  # the middle of the guide's "0.7 or 1"
VERDICTS = ("good", "undercooked", "overcooked", "overfit")


@dataclass
class Recommendation:
    epoch: int | None  # None: no LoRA cell rendered to recommend
    weight: float | None
    reasons: list[str] = field(default_factory=list)
    per_epoch_verdicts: dict[int, str] = field(default_factory=dict)


@dataclass
class _Pooled:
    epoch: int
    weight: float
    likeness: float | None
    flexibility: float | None
    overcooked: float

    @property
    def merit(self) -> float:
        recalls = [v for v in (self.likeness, self.flexibility) if v is not None]
        return (sum(recalls) / len(recalls) if recalls else 1.0) * (1.0 - self.overcooked)

    @property
    def usable(self) -> bool:
        return self.overcooked < OVERCOOKED

    @property
    def liked(self) -> bool:
        return self.usable and (self.likeness is None or self.likeness >= LIKE_OK)


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _pool(scores: Sequence[Score]) -> dict[tuple[int, float], _Pooled]:
    groups: dict[tuple[int, float], list[Score]] = {}
    for s in scores:
        groups.setdefault((s.epoch, s.weight), []).append(s)
    return {
        key: _Pooled(key[0], key[1], _mean([s.likeness for s in group]), _mean([s.flexibility for s in group]),
                     max(1.0 if s.broken else s.overcooked for s in group))
        for key, group in sorted(groups.items())
    }


def _epochs(numbers: list[int]) -> str:
    return ("epoch " if len(numbers) == 1 else "epochs ") + ", ".join(str(n) for n in numbers)


def _percent(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0%}"


def recommend(scores: Sequence[Score]) -> Recommendation:
    pooled = _pool(scores)
    baseline_flex = _mean([p.flexibility for p in pooled.values() if p.weight == 0])
    by_epoch: dict[int, list[_Pooled]] = {}
    for p in pooled.values():
        if p.weight > 0:
            by_epoch.setdefault(p.epoch, []).append(p)
    if not by_epoch:
        return Recommendation(None, None, ["the grid has no rendered cell with the LoRA: add a weight above 0"])

    verdicts: dict[int, str] = {}
    flexibility: dict[int, float | None] = {}
    reference = baseline_flex
    drops: dict[int, tuple[float, float]] = {}
    for epoch in sorted(by_epoch):
        cells = by_epoch[epoch]
        liked = [p for p in cells if p.liked]
        flex = _mean([p.flexibility for p in liked])
        flexibility[epoch] = flex
        if 2 * sum(p.usable for p in cells) < len(cells):
            verdicts[epoch] = "overcooked"
        elif not liked:
            verdicts[epoch] = "undercooked"
        elif flex is not None and reference is not None and flex < FLEX_KEEP * reference:
            verdicts[epoch] = "overfit"
            drops[epoch] = (flex, reference)
        else:
            verdicts[epoch] = "good"
        if flex is not None:
            reference = flex if reference is None else max(reference, flex)

    candidates = [p for epoch, cells in by_epoch.items() if verdicts[epoch] == "good" for p in cells if p.liked]
    fallback = not candidates
    if fallback:
        candidates = [p for cells in by_epoch.values() for p in cells if p.overcooked < 1.0]
    if not candidates:
        return Recommendation(None, None, _verdict_reasons(verdicts, drops, pooled) + [
            "every image with the LoRA is broken (black or NaN): the LoRA is overcooked; lower the learning rate or the repeats"
        ], verdicts)
    best = min(candidates, key=lambda p: (-round(p.merit, 2), p.epoch, abs(p.weight - PREFERRED_WEIGHT), p.weight))

    reasons = [f"epoch {best.epoch} at weight {format_weight(best.weight)}: likeness {_percent(best.likeness)}, "
               f"flexibility {_percent(best.flexibility)}, overcooking {_percent(best.overcooked)}"]
    if best.likeness is None:
        reasons.append("likeness is unknown (no core tags or no tagger predictions): chosen on flexibility and overcooking")
    burnt = [p.weight for p in by_epoch[best.epoch] if not p.usable and p.weight > best.weight]
    if burnt:
        reasons.append(f"at epoch {best.epoch}, weights from {format_weight(min(burnt))} overcook")
    reasons += _verdict_reasons(verdicts, drops, pooled)
    if fallback:
        reasons.append(_advice(verdicts))
    return Recommendation(best.epoch, best.weight, reasons, verdicts)


def _verdict_reasons(verdicts: dict[int, str], drops: dict[int, tuple[float, float]],
                     pooled: dict[tuple[int, float], _Pooled]) -> list[str]:
    def having(verdict: str) -> list[int]:
        return [e for e, v in verdicts.items() if v == verdict]

    reasons = []
    if having("undercooked"):
        reasons.append(f"undercooked at {_epochs(having('undercooked'))}: the core tags show at no weight "
                       f"(likeness below {LIKE_OK:.0%}), the LoRA has too little effect yet")
    if having("overcooked"):
        broken = [e for e in having("overcooked") if any(p.epoch == e and p.weight > 0 and p.overcooked >= 1.0
                                                          for p in pooled.values())]
        detail = f"; black, NaN or fully burnt images at {_epochs(broken)}" if broken else ""
        reasons.append(f"overcooked at {_epochs(having('overcooked'))}: colour clipping or artefacts at most weights{detail}")
    if having("overfit"):
        worst = min(drops.values())
        reasons.append(f"overfit at {_epochs(having('overfit'))}: the likeness holds but the flexibility prompt's tags "
                       f"collapse (down to {worst[0]:.0%} from {worst[1]:.0%})")
    return reasons


def _advice(verdicts: dict[int, str]) -> str:
    seen = set(verdicts.values())
    if seen == {"undercooked"}:
        return "no epoch is good yet: train longer (more epochs or repeats) or raise the learning rate"
    if seen == {"overcooked"}:
        return "no epoch is good: lower the learning rate or the repeats and train again"
    if "overfit" in seen and "undercooked" not in seen:
        return "no epoch is good: train fewer epochs, lower the learning rate, or add more varied images"
    return "no epoch is both like the dataset and free of problems: check the dataset's tags and the learning rate"
