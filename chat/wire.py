"""The JSON text of WebSocket frames: the server's frames encoded (orjson), the
client's decoded and checked (size, depth, shape) before any handler sees them."""

import json

import orjson
from django.conf import settings


class BadFrame(Exception):
    """A client frame that cannot be acted on; answered with an error frame."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def encode(content) -> str:
    """``content`` (a frame: JSON types only) as JSON text, with orjson: the stdlib
    encoder is a visible share of a busy worker's time, at one frame per delta per
    socket. What orjson refuses (a lone surrogate, which the
    stdlib escapes; an integer past 64 bits) goes through the stdlib as before."""
    try:
        return orjson.dumps(content).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(content)


def decode(text_data: str) -> dict:
    """The frame object of ``text_data``; raises BadFrame (too large, not JSON,
    nested too deeply, not an object with a string ``type``)."""
    if len(text_data) > settings.CHAT_MAX_MESSAGE_CHARS * 4 + 1024:
        raise BadFrame("too_large", "The frame is too large.")
    try:
        frame = json.loads(text_data)
    except RecursionError:
        raise BadFrame("bad_json", "The frame is nested too deeply.") from None
    except ValueError:
        raise BadFrame("bad_json", "The frame is not valid JSON.") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise BadFrame("bad_frame", 'A frame is an object with a "type".')
    return frame
