"""Provider text is untrusted input: what makes it safe to store, show and log.

:func:`clean_provider_text` removes what no database accepts (lone surrogates, NUL);
:func:`mask_key` and :class:`KeyMask` hide the configured API key wherever a provider
or a proxy echoes it, also when a stream's chunks split it; :func:`provider_message`
does both for an error message and cuts it. Every provider applies them to what it
reads (chat.generation.providers.base.guarded masks the streamed text).
"""

from __future__ import annotations

import re

from django.conf import settings

# Lone UTF-16 surrogates (a JSON escape such as "\udcff") cannot be encoded as UTF-8 by
# any database driver, and PostgreSQL refuses NUL in text.
_UNSAFE_TEXT = re.compile(r"[\x00\ud800-\udfff]")


def clean_provider_text(text: str) -> str:
    """Provider text made safe to store and send: each lone surrogate becomes U+FFFD
    (the Unicode replacement character, as a UTF-8 decoder does with bad bytes) and NUL
    characters are dropped. Anything else, control characters included, is kept.

    Applied where a provider reads its chunks to content, finish reasons and error
    messages, so one provider's bad output cannot fail a database write shared with
    other runs (the batched checkpoint, store.checkpoint_many). Python strings hold
    code points, so a surrogate here is always unpaired: ``json.loads`` already joins
    escaped pairs. The API key is masked after, per stream (base.StreamMasks: a key
    may span chunks) and in messages (:func:`mask_key`).
    """
    if not _UNSAFE_TEXT.search(text):
        return text
    return _UNSAFE_TEXT.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


# What the configured API key is replaced by wherever provider text may echo it.
KEY_MASK = "***"
# A shorter key is not masked (too short to tell from ordinary text); a key prefix this
# long left at the end of a stream (the key cut by the end) is masked as the key.
MIN_KEY_CHARS = 8


def mask_key(text: str, key: str | None = None) -> str:
    """``text`` with every occurrence of ``key`` (default: settings.OPENAI_API_KEY)
    replaced by ``***``; keys shorter than 8 characters are not masked. Mask before
    cutting a text: a cut through the key would leave a prefix nothing recognises."""
    key = settings.OPENAI_API_KEY if key is None else key
    if key and len(key) >= MIN_KEY_CHARS and key in text:
        return text.replace(key, KEY_MASK)
    return text


def provider_message(value, limit: int = 300) -> str:
    """A provider's message (any JSON value) as clean text of at most ``limit`` chars;
    the configured API key is masked, before the cut, should a provider or proxy echo
    it."""
    return mask_key(clean_provider_text(str(value or "").strip()))[:limit]


class KeyMask:
    """Masks an API key in one kind of streamed text (answer or reasoning) of one stream,
    also when the provider's chunks split it.

    :meth:`feed` takes the next chunk's text and returns what may be sent now: the key
    masked, and the tail that could begin it (a proper prefix of the key, so at most
    ``len(key) - 1`` characters, and only when the tail matches) held back and joined
    to the next chunk. :meth:`flush` gives the held tail once the text has ended (a
    prefix of 8 or more characters, the key cut by the end, comes out masked). Cost per
    chunk: one substring test and a search for the key's first character in the
    chunk's last ``len(key) - 1`` characters."""

    __slots__ = ("_first", "_held", "_key")

    def __init__(self, key: str):
        self._key, self._first, self._held = key, key[0], ""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, text: str) -> str:
        """The part of the held text plus ``text`` that can be sent now, key masked."""
        if self._held:
            text, self._held = self._held + text, ""
        key = self._key
        if key in text:
            text = text.replace(key, KEY_MASK)
        # The longest tail that is a proper prefix of the key: the first match wins.
        at = text.find(self._first, max(len(text) - len(key) + 1, 0))
        while at != -1:
            if key.startswith(text[at:]):
                self._held = text[at:]
                return text[:at]
            at = text.find(self._first, at + 1)
        return text

    def flush(self) -> str:
        """The held text, now that no more text of this kind follows."""
        held, self._held = self._held, ""
        return KEY_MASK if len(held) >= MIN_KEY_CHARS else held




def count(value) -> int | None:
    """A token count as reported, or None when it is not a believable one: above 10**9
    a count is not believable, and would overflow UsageRecord's fields."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
        return None
    return value

