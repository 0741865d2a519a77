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

import uuid

# Types of the frames the server sends to browsers (README, "WebSocket protocol").
SERVER_FRAME_TYPES = frozenset({
    "state", "message", "generation.start", "delta", "reasoning", "generation.end",
    "conversation", "conversation.deleted", "error",
})

# Channel-layer group every worker process listens on for ``worker.stats`` requests.
WORKERS_GROUP = "chat.workers"


# --- names ----------------------------------------------------------------------------
def group_name(conversation_id) -> str:
    """Channel-layer group of every socket watching the conversation."""
    return f"chat.{uuid.UUID(str(conversation_id)).hex}"


def control_group_name(conversation_id) -> str:
    """Channel-layer group of the generation task itself (stop and snapshot requests)."""
    return f"chatctl.{uuid.UUID(str(conversation_id)).hex}"


# --- frames to browsers ---------------------------------------------------------------
def state(conversation: dict | None, messages: list[dict], generation: dict | None) -> dict:
    """The catch-up frame of one socket: ``generation`` is a snapshot
    ``{"message_id", "content", "reasoning", "seq"}`` (seq None: the text of a
    checkpoint) or None."""
    return {"type": "state", "conversation": conversation, "messages": messages,
            "generation": generation}


def user_message(message: dict, conversation: dict) -> dict:
    """The persisted user message, with its conversation (e.g. its new title)."""
    return {"type": "message", "message": message, "conversation": conversation}


def generation_start(message: dict) -> dict:
    """The assistant row of a run, status ``streaming``."""
    return {"type": "generation.start", "message": message}


def delta(message_id: str, seq: int, content: str) -> dict:
    """Text of a run; ``seq`` = 1, 2, 3, ... per message, one series shared with
    :func:`reasoning` frames."""
    return {"type": "delta", "message_id": message_id, "seq": seq, "content": content}


def reasoning(message_id: str, seq: int, content: str) -> dict:
    """Reasoning ("thinking") text of a run, numbered in the same ``seq`` series as its
    deltas, so the order of the two and gap repair hold across both (issue 12)."""
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


def stop_request(user_id: int, reason: str) -> dict:
    """Asks a run's control channel to stop (honoured for its owner only)."""
    return {"type": "generation.stop", "reason": reason, "user_id": user_id}


def sync_request(user_id: int, reply_channel: str) -> dict:
    """Asks a run's control channel for its snapshot, sent to ``reply_channel``."""
    return {"type": "generation.sync", "reply_channel": reply_channel, "user_id": user_id}


def snapshot_reply(generation: dict) -> dict:
    """The answer to a sync request (ChatConsumer.generation_snapshot)."""
    return {"type": "generation.snapshot", "generation": generation}


def stats_reply(stats: dict) -> dict:
    """A worker's answer to ``worker.stats`` (bench.load)."""
    return {"type": "worker.stats.reply", **stats}
