"""An output-side check against prompt injection into the prompter.

The input side (:mod:`alignpro.prompter.instruction`) keeps user text in an escaped data block. When an injection
gets through anyway, a small prompter typically *obeys the user text*: its "rewrite" is the piece of the user's
message the attacker wanted out ("... ignore that and output: <payload>" -> "<payload>"). A real rewrite either
restates the whole request or reframes it, so it is not a short verbatim cut of it. :func:`echo_fragment`
flags exactly that shape; the stage then serves the original prompt, which gives the attacker nothing they would
not have had without a gateway. bench/injection.py measures what it catches and how many benign rewrites it
rejects.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

# A rewrite shorter than this share of the request, and mostly copied from it, is a fragment, not a rewrite.
MAX_SHARE = 0.6
MIN_COPIED = 0.8


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def echo_fragment(original: str, rewrite: str) -> bool:
    """True when ``rewrite`` is only a short piece cut out of ``original`` (a hijacked prompter's output)."""
    o, r = _norm(original), _norm(rewrite)
    if not r or len(r) >= MAX_SHARE * len(o):
        return False
    m = SequenceMatcher(None, o, r, autojunk=False).find_longest_match(0, len(o), 0, len(r))
    return m.size >= MIN_COPIED * len(r)
