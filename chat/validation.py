"""One set of rules for the text users send, used by the WebSocket consumer, the REST API
(chat.api.fields.TextField) and chat.generation.start_generation alike.

What the database can store decides the rules:

- a lone surrogate (U+D800-U+DFFF, e.g. the JSON escape ``"\\udcff"``) cannot be
  encoded as UTF-8, so saving it fails (UnicodeEncodeError on SQLite, an encoding error
  on PostgreSQL): such text is refused;
- NUL (U+0000) cannot be stored in a PostgreSQL ``text`` column (DataError): it is
  dropped, as the REST API always did.

Lengths are counted on the text as sent, before anything is dropped, so a limit means
the same whichever door the text came through.
"""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError

# Python strings hold astral characters as one code point (json.loads joins a valid
# "\ud83d\ude00" pair into one), so any code point in this range is a lone surrogate.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TextRejected(ValidationError):
    """Text that breaks one of the rules above.

    ``code`` is the WebSocket ``error`` frame code (``empty``, ``too_large``,
    ``invalid``, ``bad_frame``) and ``message`` a sentence for the user. It is a Django
    ValidationError, so a DRF field that runs these checks answers 400 naming the field.
    """

    def __init__(self, message: str, code: str):
        super().__init__(message, code=code)


def refuse_lone_surrogates(text: str) -> None:
    """Raise TextRejected (code ``invalid``) when ``text`` holds a lone surrogate.

    Usable as a Django/DRF validator (a callable of the value)."""
    found = LONE_SURROGATE.search(text)
    if found is not None:
        raise TextRejected(
            f"Lone surrogate characters are not allowed (U+{ord(found.group()):04X}).",
            code="invalid",
        )


def drop_nul(text: str) -> str:
    """``text`` without its NUL characters (PostgreSQL text cannot hold them)."""
    return text.replace("\x00", "") if "\x00" in text else text


def clean_text(
    value, *, max_chars: int, required: bool = True, name: str = "content"
) -> str:
    """The text a user sent, ready to save: checked, NUL dropped, not trimmed.

    ``value`` must be a str (else ``empty`` when ``required``, ``bad_frame`` otherwise)
    of at most ``max_chars`` characters as sent (``too_large``) without lone
    surrogates (``invalid``). When ``required``, something other than white space and
    NUL must be left (``empty``). Raises TextRejected; ``name`` is used in its message.
    """
    if not isinstance(value, str):
        if required:
            raise TextRejected(f'"{name}" must be a non-empty string.', code="empty")
        raise TextRejected(f'"{name}" must be a string.', code="bad_frame")
    if len(value) > max_chars:
        raise TextRejected(f'"{name}" is at most {max_chars} characters.', code="too_large")
    refuse_lone_surrogates(value)
    value = drop_nul(value)
    if required and not value.strip():
        raise TextRejected(f'"{name}" must not be empty.', code="empty")
    return value
