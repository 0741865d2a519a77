"""The prompt sent upstream: system prompt plus the visible history, trimmed to fit.

Also the prompt a finished-elsewhere run was probably generated from, which the lease
sweep and the budgets estimate tokens with.
"""

from __future__ import annotations

import itertools

from django.conf import settings

from .. import accounting
from ..models import Conversation, Message
from .errors import InvalidRequest


def history_of(messages):
    """The messages of ``messages`` (a Message queryset) a prompt may carry, newest
    first: visible, not streaming, with text, from the user or the assistant (partial
    answers of stopped runs included: the user saw them)."""
    return (messages.visible().exclude(status=Message.Status.STREAMING).exclude(content="")
            .filter(role__in=[Message.Role.USER, Message.Role.ASSISTANT])
            .order_by("-created_at"))


def build_prompt(conversation: Conversation, *, pending: str | None = None,
                 history: list[tuple[str, str]] | None = None) -> list[dict]:
    """The prompt of :func:`counted_prompt`."""
    return counted_prompt(conversation, pending=pending, history=history)[0]


def counted_prompt(conversation: Conversation, *, pending: str | None = None,
                   history: list[tuple[str, str]] | None = None) -> tuple[list[dict], int]:
    """``(prompt, prompt_tokens)``: the prompt, with its ``accounting.count_prompt_tokens``
    counted as it is built (each text tokenized once).

    The prompt: system prompt plus the visible history, trimmed from the oldest message so the
    prompt fits ``CHAT_CONTEXT_TOKENS - CHAT_MAX_TOKENS`` tokens:
    ``[{"role", "content"}, ...]``.

    Partial answers of stopped runs are kept (the user saw them); failed answers with no
    text and streaming rows are left out. Raises InvalidRequest when even the newest
    user message alone does not fit.

    ``pending``: the text of a user message the caller's transaction saves after this
    (the newest message of the prompt); ``history``: ``[(role, content), ...]`` newest
    first when the caller knows it (``[]`` for a conversation it just created), instead
    of the query.
    """
    system = conversation.system_prompt or settings.CHAT_SYSTEM_PROMPT
    counted = accounting.count_prompt_tokens([{"role": "system", "content": system}])
    budget = settings.CHAT_CONTEXT_TOKENS - settings.CHAT_MAX_TOKENS - counted
    if history is None:
        history = history_of(conversation.messages.all()).values_list("role", "content")
    if pending:
        history = itertools.chain([(Message.Role.USER.value, pending)], history)
    kept: list[dict] = []
    for role, content in history:
        cost = accounting.TOKENS_PER_MESSAGE + accounting.count_tokens(content)
        if cost > budget:
            break
        budget -= cost
        counted += cost
        kept.append({"role": role, "content": content})
    if not kept:
        raise InvalidRequest("The message is too long for the model's context window.")
    return [{"role": "system", "content": system}, *reversed(kept)], counted


def prompt_for_estimate(conversation: Conversation, before) -> list[dict]:
    """The prompt a message created at ``before`` was (probably) generated from, for
    usage estimates of runs whose own prompt is gone (a lease sweep, budgets): the
    system prompt and the visible history before it, untrimmed. Never raises
    InvalidRequest."""
    system = conversation.system_prompt or settings.CHAT_SYSTEM_PROMPT
    history = (
        conversation.messages.visible()
        .filter(created_at__lt=before)
        .exclude(content="")
        .values_list("role", "content")
    )
    return [{"role": "system", "content": system}] + [
        {"role": role, "content": content} for role, content in history
    ]


# The name callers of the old module knew.
build_prompt_safe = prompt_for_estimate
