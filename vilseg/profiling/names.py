"""One model vocabulary across the profiler (``tools/profile_memory.py``) and the complexity tool
(``tools/analyze_complexity.py``): each accepts the other's spelling of the same model."""
from __future__ import annotations

from typing import Iterable

__all__ = ["SAME_MODEL", "known_name"]

# the spellings of one backbone; the first is the profiler's, the second the complexity tool's (after the configs:
# configs/baselines/deit_t_*, configs/sequencer/sequencer2d_s_*, configs/lambda/lambda_resnet50_*)
SAME_MODEL = (
    ("vit-t", "deit-t"),
    ("vit-t-sdpa", "deit-t-sdpa"),
    ("sequencer2d", "sequencer2d-s"),
    ("lambdaresnet", "lambdaresnet50", "lambda-resnet50"),
)


def known_name(name: str, known: Iterable[str]) -> str:
    """``name`` (lower-cased; a ``+head`` suffix kept) in the spelling that ``known`` uses, or ``name`` itself
    when no spelling of it is known (the caller then reports it as unknown)."""
    name = name.strip().lower()
    known = set(known)
    if name in known:
        return name
    base, plus, head = name.partition("+")
    for spellings in SAME_MODEL:
        if base in spellings:
            for other in spellings:
                if other + plus + head in known:
                    return other + plus + head
    return name
