"""Short plain-text excerpts of message text (markdown) for lists and links.

Messages are markdown (CommonMark, as the chat page renders them): an excerpt drops
the markup people would otherwise read as stray characters (``## ``, ``**``, link
targets, fences) and is cut at a word, never inside one.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"

_FENCE = re.compile(r"^\s*(```|~~~).*$", re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_LINE_MARK = re.compile(r"^\s{0,3}(#{1,6}\s+|>\s?|[-*+]\s+|\d+[.)]\s+)", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*\*|\*|~~|`)(?=\S)(.+?)(?<=\S)\1")
# Underscores emphasise only outside words (CommonMark): snake_case stays as it is.
_UNDERSCORE = re.compile(r"(?<!\w)(__|_)(?=\S)(.+?)(?<=\S)\1(?!\w)")
_RULE = re.compile(r"^\s*([-*_]\s*){3,}$", re.MULTILINE)


def markdown_to_text(markdown: str) -> str:
    """``markdown`` as one line of plain text: headings, quotes, list markers, emphasis,
    inline code marks and fences removed, links and images replaced by their text,
    whitespace runs made one space."""
    text = _FENCE.sub("", markdown)
    text = _RULE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARK.sub("", text)
    for _ in range(2):  # nested emphasis: **_word_**
        text = _UNDERSCORE.sub(r"\2", _EMPHASIS.sub(r"\2", text))
    return " ".join(text.split())


def plain_excerpt(markdown: str, limit: int = 80) -> str:
    """At most ``limit`` characters (ellipsis included) of ``markdown`` as plain text
    (``markdown_to_text``), cut after the last whole word that fits and ended with
    "…" when cut; ``"(empty)"`` for text with no words. A single word longer than the
    limit is cut inside, as nothing else would fit."""
    text = markdown_to_text(markdown or "")
    if not text:
        return "(empty)"
    if len(text) <= limit:
        return text
    room = text[: limit - len(ELLIPSIS) + 1]
    cut = room.rfind(" ")
    head = room[:cut] if cut > 0 else room[:-1]
    return head.rstrip(" ,;:.-–—") + ELLIPSIS
