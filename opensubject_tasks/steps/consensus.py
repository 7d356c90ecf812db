"""Category consensus (pure): which subject categories a clip shows, from the VLM's
answers on a few of its keyframes.

The categories named on at least ``consensus_share`` of the keyframes asked are kept,
provided at least ``consensus_min_answers`` keyframes answered; otherwise the clip has no
consensus, with the reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from opensubject_tasks.backends.base import CategoryList
from opensubject_tasks.backends.categories import normalise_category


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


@dataclass
class Consensus:
    """What the keyframes asked said about the clip's subject categories."""
    kept: dict[str, float]               # category -> share of the keyframes asked naming it
    named: dict[str, float]              # every valid category named, with its share
    asked: int
    answered: int                        # keyframes whose reply was a usable list
    rejected: dict[str, int]             # refused entries -> keyframes that gave them
    errors: list[str]                    # why the other keyframes gave no usable list
    reason: str | None = None            # why there is no consensus

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "named": self.named, "asked": self.asked, "answered": self.answered,
                "rejected": self.rejected, "errors": self.errors, "reason": self.reason}


def category_consensus(lists: Sequence[CategoryList], share: float, min_answers: int = 1) -> Consensus:
    """Categories named on at least ``share`` of the keyframes asked.

    A frame's valid entries count even when it also gave refused words ("dog, grass":
    a vote for dog, "grass" recorded apart); names are compared in their normal form
    ("Dogs" = "dog"). Shares divide by the frames asked, not by those that answered,
    so one frame of four cannot carry a category; and fewer than ``min_answers``
    answering frames are no consensus at all."""
    asked = len(lists)
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    errors: list[str] = []
    answered = 0
    for cl in lists:
        rejected.update(set(cl.rejected))
        if cl.error is not None:
            errors.append(cl.error)
            continue
        answered += 1
        counts.update({n for n in (normalise_category(c) for c in cl.categories if c) if n})
    named = {c: round(k / asked, 4) for c, k in sorted(counts.items())} if asked else {}
    kept = {c: v for c, v in named.items() if v >= share - 1e-9}
    reason = None
    need = min(min_answers, asked)
    if answered < max(need, 1):
        why = "; ".join(sorted(set(errors)))[:300]
        reason = (f"no category consensus: {answered} of {asked} keyframes gave a usable answer "
                  f"(at least {max(need, 1)} needed){': ' + why if why else ''}")
    elif not kept:
        seen = ", ".join(f"{c} {v:.0%}" for c, v in sorted(named.items(), key=lambda kv: -kv[1])[:5])
        reason = (f"no category consensus: no category named on {share:.0%} of {asked} keyframes"
                  f" ({seen or 'none named'})")
    if reason and rejected:
        reason += "; refused: " + ", ".join(sorted(rejected))[:200]
    return Consensus({} if reason else kept, named, asked, answered, dict(sorted(rejected.items())),
                     errors, reason)
