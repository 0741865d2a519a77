"""The state a newly connected socket loads: the latest visible messages of a
conversation and its streaming answer. Synchronous (call it through
``database_sync_to_async``); reads only.
"""

from __future__ import annotations

from ..models import Conversation, Message
from . import frames
from .errors import Forbidden

# Messages read per query by load_state, newest first: a usual conversation in one.
STATE_BATCH = 100


def load_state(user, conversation_id) -> dict:
    """What a newly connected socket needs: ``{"conversation": dict or None,
    "messages": [dict, ...], "streaming": dict or None, "has_more": bool}``: the latest
    visible messages, oldest first, as far as they may fit a state frame
    (``frames.STATE_BUDGET_BYTES``, counted at one byte per character, a lower bound
    of their JSON size, so frames.state has all it can send), ``has_more`` when older
    ones were left unread, and the streaming assistant message if any, as saved at the
    last checkpoint. Two queries for a conversation of up to STATE_BATCH messages
    whatever their size. Raises Forbidden for another user's conversation."""
    conversation = Conversation.objects.filter(id=conversation_id).first()
    if conversation is None:
        return {"conversation": None, "messages": [], "streaming": None, "has_more": False}
    if conversation.owner_id != user.id:
        raise Forbidden("This conversation belongs to someone else.")
    newest_first = (conversation.messages.visible().select_related("usage")
                    .order_by("-created_at", "-id"))
    messages: list[Message] = []
    chars, has_more = 0, False
    while not has_more:
        batch = list(newest_first[len(messages):len(messages) + STATE_BATCH])
        for message in batch:
            if chars > frames.STATE_BUDGET_BYTES:
                has_more = True
                break
            messages.append(message)
            chars += len(message.content) + len(message.reasoning)
        if len(batch) < STATE_BATCH:
            break
    messages.reverse()
    streaming = next((m for m in messages if m.status == Message.Status.STREAMING), None)
    if streaming is None and has_more:
        streaming = conversation.messages.visible().streaming().first()
    return {
        "conversation": conversation.to_dict(),
        "messages": [m.to_dict() for m in messages],
        "streaming": streaming.to_dict() if streaming else None,
        "has_more": has_more,
    }
