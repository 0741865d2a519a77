"""Every server frame, and the envelope that carries one between processes.

The WebSocket protocol in README.md is the contract; this module is the only place in
chat/ that knows a frame's shape or the ``chat.frame`` envelope that carries it through
the channel layer (tests/test_architecture.py checks it). Sending is
chat.generation.fanout's (``service.send_to_group``). Payloads of messages and
conversations are the dicts of ``Message.to_dict()`` / ``Conversation.to_dict()``, the
one serializer the REST API shares (chat.api.serializers delegates to it).

Control messages of the channel layer (stop, sync, snapshot, worker stats) are built
here too: they are not sent to browsers, but they are the same kind of contract between
processes.

Nothing here imports the rest of chat/: frames are data.
"""

from __future__ import annotations

import json
import uuid

import orjson

# Types of the frames the server sends to browsers (README, "WebSocket protocol").
SERVER_FRAME_TYPES = frozenset({
    "state", "message", "generation.start", "delta", "reasoning", "generation.end",
    "conversation", "conversation.deleted", "error",
})

# Channel-layer group every worker process listens on for ``worker.stats`` requests.
WORKERS_GROUP = "chat.workers"

# --- sizes -------------------------------------------------------------------------------
# daphne (through autobahn) refuses to send a WebSocket message over 1 MiB: it drops the
# connection with 1011 (autobahn's PayloadExceededError). Every frame stays far below.
FRAME_LIMIT_BYTES = 1024 * 1024
# What a ``state`` frame's JSON text may take, in bytes (UTF-8): the latest messages
# up to this, older ones left for the REST API (``has_more``).
STATE_BUDGET_BYTES = 512 * 1024
# The most JSON bytes one str character can take: the stdlib encoder, which the
# consumer falls back to (ChatConsumer.encode_json), writes a character outside the BMP
# as a surrogate pair of ``\uXXXX`` escapes (12 bytes); a control character is one
# escape (6), anything else at most 4 bytes of UTF-8.
MAX_JSON_BYTES_PER_CHAR = 12
# A delta or reasoning frame carries at most this many characters (384 KiB of JSON at
# worst); a longer text is sent as several frames, each with its own seq.
DELTA_MAX_CHARS = 32 * 1024
# A message that does not fit the rest of a state's budget is still sent, cut, when at
# least this much of the budget is left (always when it is the newest message).
MIN_CUT_BYTES = 4 * 1024


# --- names ----------------------------------------------------------------------------
def group_name(conversation_id) -> str:
    """Channel-layer group of every socket watching the conversation."""
    return f"chat.{uuid.UUID(str(conversation_id)).hex}"


def control_group_name(conversation_id) -> str:
    """Channel-layer group of the generation task itself (stop and snapshot requests)."""
    return f"chatctl.{uuid.UUID(str(conversation_id)).hex}"


def encoded_size(value) -> int:
    """Bytes of ``value``'s JSON text (UTF-8) as a socket sends it: orjson, the stdlib
    encoder for what orjson refuses (as ChatConsumer.encode_json)."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return len(json.dumps(value).encode())


def text_pieces(text: str, max_chars: int = DELTA_MAX_CHARS) -> list[str]:
    """``text`` in pieces of at most ``max_chars`` characters, in order (one piece when
    it is short enough; [] for ""), so each piece's frame stays under
    FRAME_LIMIT_BYTES whatever the characters (MAX_JSON_BYTES_PER_CHAR)."""
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def _cut(text: str, max_bytes: int, *, keep_end: bool) -> str:
    """The longest start (or end, ``keep_end``) of ``text`` whose JSON string takes at
    most ``max_bytes`` bytes."""
    if encoded_size(text) <= max_bytes:
        return text
    low, high = 0, min(len(text), max(0, max_bytes))
    while low < high:  # the largest n that fits; the size grows with n
        n = (low + high + 1) // 2
        if encoded_size(text[len(text) - n:] if keep_end else text[:n]) <= max_bytes:
            low = n
        else:
            high = n - 1
    return text[len(text) - low:] if keep_end and low else text[:low]


def cut_message(message: dict, max_bytes: int, *, keep_end: bool = False) -> dict:
    """``message`` (a message dict) with ``content`` and ``reasoning`` cut so its JSON
    takes at most about ``max_bytes`` bytes, and ``"truncated": true``. A finished
    message keeps the start of its text (the client fetches it whole over REST); a
    streaming one (``keep_end``) the end, which its later deltas continue. Reasoning
    gets at most half of the room when the answer text needs the rest."""
    room = max(0, max_bytes - encoded_size({**message, "content": "", "reasoning": "",
                                            "truncated": True}))
    content, reasoning = message.get("content") or "", message.get("reasoning") or ""
    reasoning_room = min(encoded_size(reasoning), max(room // 2, room - encoded_size(content)))
    reasoning = _cut(reasoning, reasoning_room, keep_end=keep_end)
    content = _cut(content, room - encoded_size(reasoning), keep_end=keep_end)
    return {**message, "content": content, "reasoning": reasoning, "truncated": True}


# --- frames to browsers ---------------------------------------------------------------
def state(conversation: dict | None, messages: list[dict], generation: dict | None, *,
          has_more: bool = False, budget: int = STATE_BUDGET_BYTES) -> dict:
    """The catch-up frame of one socket, whose JSON takes at most about ``budget``
    bytes: the latest of ``messages`` (in order, oldest first) that fit, and
    ``has_more`` when older ones are left out (or ``has_more`` was given: the caller
    loaded only the latest; the client loads older ones over REST). The newest message
    left out is sent cut (:func:`cut_message`, ``"truncated": true``) if enough of the
    budget is left, always when it is the newest of all.

    ``generation`` is a snapshot ``{"message_id", "content", "reasoning", "seq"}``
    (seq None: the text of a checkpoint) or None; its text is that of the streaming
    message in ``messages``, cut the same way (its end kept) when that message is."""
    skeleton = {"type": "state", "conversation": conversation, "messages": [],
                "generation": generation and {**generation, "content": "", "reasoning": ""},
                "has_more": True}
    room = budget - encoded_size(skeleton)
    streaming_id = generation["message_id"] if generation else None
    kept: list[dict] = []
    for message in reversed(messages):
        # The streaming message's text travels twice: in the message and the snapshot.
        copies = 2 if message["id"] == streaming_id else 1
        size = copies * encoded_size(message) + 2
        if size <= room:
            kept.append(message)
            room -= size
            continue
        if not kept or room >= MIN_CUT_BYTES:
            kept.append(cut_message(message, room // copies - 2,
                                    keep_end=message["id"] == streaming_id))
        break
    kept.reverse()
    if generation is not None:
        shown = next((m for m in kept if m["id"] == streaming_id), None)
        if shown is None:  # not among the latest (never so in practice): no text
            generation = {**generation, "content": "", "reasoning": ""}
        elif shown.get("truncated"):
            generation = {**generation, "content": shown["content"],
                          "reasoning": shown["reasoning"]}
    return {"type": "state", "conversation": conversation, "messages": kept,
            "generation": generation, "has_more": has_more or len(kept) < len(messages)}


def user_message(message: dict, conversation: dict) -> dict:
    """The persisted user message, with its conversation (e.g. its new title)."""
    return {"type": "message", "message": message, "conversation": conversation}


def generation_start(message: dict) -> dict:
    """The assistant row of a run, status ``streaming``."""
    return {"type": "generation.start", "message": message}


def delta(message_id: str, seq: int, content: str) -> dict:
    """Text of a run; ``seq`` = 1, 2, 3, ... per message, one series shared with
    :func:`reasoning` frames. ``content``: at most DELTA_MAX_CHARS characters
    (:func:`text_pieces`), so the frame stays under FRAME_LIMIT_BYTES."""
    return {"type": "delta", "message_id": message_id, "seq": seq, "content": content}


def reasoning(message_id: str, seq: int, content: str) -> dict:
    """Reasoning ("thinking") text of a run, numbered in the same ``seq`` series as its
    deltas, so the order of the two and gap repair hold across both."""
    return {"type": "reasoning", "message_id": message_id, "seq": seq, "content": content}


def generation_end(
    message_id, status: str, finish_reason: str, usage: dict | None, error: str | None
) -> dict:
    """The one end frame of a run; ``usage`` is ``UsageRecord.to_dict()``; an empty
    ``error`` is sent as null."""
    return {"type": "generation.end", "message_id": str(message_id), "status": status,
            "finish_reason": finish_reason, "usage": usage, "error": error or None}


def conversation_changed(conversation: dict) -> dict:
    """The conversation was changed through the API (title, model, system prompt)."""
    return {"type": "conversation", "conversation": conversation}


def conversation_deleted(conversation_id) -> dict:
    """The conversation was deleted through the API."""
    return {"type": "conversation.deleted", "conversation_id": str(conversation_id)}


def error(code: str, detail: str, **extra) -> dict:
    """An error answer to the socket that sent a frame; ``extra``: e.g. the budget's
    ``limit``/``remaining`` (docs/admin.md)."""
    return {"type": "error", "code": code, "detail": detail, **extra}


def snapshot(message_id: str, content: str, seq: int | None, reasoning: str = "") -> dict:
    """The ``generation`` field of a state frame: the text of every delta and the
    reasoning of every reasoning frame up to ``seq`` (None: position unknown, the text
    of the last checkpoint)."""
    return {"message_id": message_id, "content": content, "reasoning": reasoning, "seq": seq}


# --- channel-layer messages --------------------------------------------------------------
def envelope(frame: dict, *, group: str, origin: str) -> dict:
    """The channel-layer message carrying ``frame`` to the other processes watching
    ``group`` (their chat.generation.fanout relay); ``origin`` names the sending
    process's Fanout, whose own relay ignores it (its sockets had the frame already)."""
    return {"type": "chat.frame", "frame": frame, "group": group, "origin": origin}


def stop_request(user_id: int, reason: str, tab: str | None = None, at: float = 0.0) -> dict:
    """Asks a run's control channel to stop (honoured for its owner only; with ``tab``,
    only by a run that tab started); ``at``: when it was asked for (``time.time()``, s),
    so the run's stop-to-close time includes the way through the channel layer."""
    frame = {"type": "generation.stop", "reason": reason, "user_id": user_id, "at": at}
    if tab is not None:
        frame["tab"] = tab
    return frame


def sync_request(user_id: int, reply_channel: str) -> dict:
    """Asks a run's control channel for its snapshot, sent to ``reply_channel``."""
    return {"type": "generation.sync", "reply_channel": reply_channel, "user_id": user_id}


def snapshot_reply(generation: dict) -> dict:
    """The answer to a sync request (ChatConsumer.generation_snapshot)."""
    return {"type": "generation.snapshot", "generation": generation}


def stats_reply(stats: dict) -> dict:
    """A worker's answer to ``worker.stats`` (bench.load)."""
    return {"type": "worker.stats.reply", **stats}


def handover_notice(worker: str) -> dict:
    """To every worker (group WORKERS_GROUP): runs of ``worker`` wait to be taken over
    (chat.generation.handover)."""
    return {"type": "generation.handover", "worker": worker}
