"""Generations: stream a chat completion, publish its deltas, and really stop it.

This module knows nothing of WebSockets or HTTP. A caller (the WebSocket consumer, the
SSE view) calls :func:`start_generation` and gets a :class:`Generation` whose frames go
to the conversation's channel-layer group (every open tab) and to local subscribers.

Frames published (the WebSocket protocol in README.md is their contract)::

    {"type": "message", "message": {...}, "conversation": {...}}      the user message
    {"type": "generation.start", "message": {...}}                     assistant row
    {"type": "delta", "message_id": str, "seq": int, "content": str}   seq = 1, 2, ...
    {"type": "generation.end", "message_id": str, "status": str, "finish_reason": str,
     "usage": {...}, "error": str | None}

Stopping: :meth:`Generation.cancel` (same process) or :func:`request_stop` (any process,
through the conversation's control group) cancels the task. The upstream stream is
opened with ``async with stream:`` so the HTTP response is closed whatever await the
task was at when cancelled; the provider sees the connection close and stops
generating. Every run, whatever its end, finishes with exactly one ``generation.end``
frame and one ``UsageRecord``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import socket
import time
import uuid
from contextvars import Context
from dataclasses import dataclass, field

import openai
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import accounting, autostop, validation
from .layers import release_channel
from .models import Conversation, Message, UsageRecord

logger = logging.getLogger(__name__)

# Identifies this process in Message.worker (host:pid:random, unique across restarts).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

# Generations running in this process, by conversation id.
_running: dict[uuid.UUID, Generation] = {}


# --- errors ---------------------------------------------------------------------------
class GenerationError(Exception):
    """A generation could not start. ``code`` is the ``error`` frame code (README)."""

    code = "error"

    def __init__(self, detail: str, **extra):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_frame(self) -> dict:
        return {"type": "error", "code": self.code, "detail": self.detail, **self.extra}


class Busy(GenerationError):
    """A generation already runs in this conversation (error frame ``busy``; HTTP 409)."""

    code = "busy"


class Forbidden(GenerationError):
    """The conversation belongs to another user (``forbidden``; HTTP 404)."""

    code = "forbidden"


class InvalidRequest(GenerationError):
    """Empty, too long or otherwise unusable input (``invalid``; HTTP 400)."""

    code = "invalid"


class QuotaExceeded(GenerationError):
    """Over the user's token/USD budget (``quota_exceeded``; HTTP 429); see budgets."""

    code = "quota_exceeded"


# --- names ----------------------------------------------------------------------------
def group_name(conversation_id) -> str:
    """Channel-layer group of every socket watching the conversation."""
    return f"chat.{uuid.UUID(str(conversation_id)).hex}"


def control_group_name(conversation_id) -> str:
    """Channel-layer group of the generation task itself (stop and snapshot requests)."""
    return f"chatctl.{uuid.UUID(str(conversation_id)).hex}"


async def broadcast(conversation_id, frame: dict, *, layer=None) -> None:
    """Send ``frame`` to every socket of the conversation (e.g. a ``conversation``
    frame after a rename through the API)."""
    layer = layer or get_channel_layer()
    await layer.group_send(group_name(conversation_id), {"type": "chat.frame", "frame": frame})


def running_generation(conversation_id) -> Generation | None:
    """The generation of the conversation running in this process, if any."""
    return _running.get(uuid.UUID(str(conversation_id)))


# --- upstream client --------------------------------------------------------------------
def uses_demo_model() -> bool:
    """True when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set."""
    return not settings.OPENAI_API_KEY and not settings.OPENAI_BASE_URL


_clients: dict[tuple, openai.AsyncOpenAI] = {}


async def get_client() -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` client for the running event loop (its connection pool is
    bound to the loop), pointed at the configured provider or the demo model."""
    if uses_demo_model():
        from .demo_model import ensure_demo_server

        server = await ensure_demo_server(settings.DEMO_TOKENS_PER_SECOND)
        base_url, api_key = server.base_url, "demo"
    else:
        # Local servers (vLLM, Ollama, llama.cpp) accept any key but the SDK wants one.
        base_url, api_key = settings.OPENAI_BASE_URL or None, settings.OPENAI_API_KEY or "none"
    # httpx's connect timeout is the first-byte budget: a provider that cannot even be
    # connected to fails as soon as one that never sends its headers (see _run, which
    # bounds the wait for the headers, retries included).
    timeout = openai.Timeout(
        settings.OPENAI_TIMEOUT_S, connect=settings.OPENAI_FIRST_BYTE_TIMEOUT_S
    )
    key = (
        id(asyncio.get_running_loop()), base_url, hash(api_key),
        settings.OPENAI_TIMEOUT_S, settings.OPENAI_FIRST_BYTE_TIMEOUT_S,
        settings.OPENAI_MAX_RETRIES,
    )
    client = _clients.get(key)
    if client is None:
        client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=settings.OPENAI_MAX_RETRIES,
        )
        _clients[key] = client
    return client


# --- what the provider sends (untrusted input) ----------------------------------------
# Lone UTF-16 surrogates (a JSON escape such as "\udcff") cannot be encoded as UTF-8 by
# any database driver, and PostgreSQL refuses NUL in text.
_UNSAFE_TEXT = re.compile(r"[\x00\ud800-\udfff]")


def clean_provider_text(text: str) -> str:
    """Provider text made safe to store and send: each lone surrogate becomes U+FFFD
    (the Unicode replacement character, as a UTF-8 decoder does with bad bytes) and NUL
    characters are dropped. Anything else, control characters included, is kept.

    Applied where chunks are read (``Generation._run``) to content, finish reasons and
    error messages, so one provider's bad output cannot fail a database write shared
    with other runs (the batched checkpoint, chat.leases.checkpoint_many). Python
    strings hold code points, so a surrogate here is always unpaired: ``json.loads``
    already joins escaped pairs.
    """
    if not _UNSAFE_TEXT.search(text):
        return text
    return _UNSAFE_TEXT.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


def _provider_message(value, limit: int = 300) -> str:
    """A provider's message (any JSON value) as clean text of at most ``limit`` chars;
    the configured API key is masked should a provider or proxy echo it."""
    text = clean_provider_text(str(value or "").strip())
    key = settings.OPENAI_API_KEY
    if key and len(key) >= 8:
        text = text.replace(key, "***")
    return text[:limit]


def _reported_usage(usage) -> dict | None:
    """``{"prompt_tokens", "completion_tokens"}`` from a chunk's ``usage``, or None when
    it is missing or not two non-negative integers (then the tokens are estimated)."""
    if usage is None:
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
        # Above 10**9 a count is not believable, and would overflow UsageRecord's fields.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
            return None
        counts[name] = value
    return counts


def _read_chunk(chunk) -> tuple[str, str, dict | None]:
    """``(content, finish_reason, usage)`` of one streamed chunk, all cleaned.

    Tolerates what real providers send beside the reference format: no ``choices``
    (Azure's prompt-filter chunks), ``choices: null`` (some usage chunks), a choice
    without ``delta``, non-string content. ``finish_reason`` fits Message.finish_reason.
    """
    content: list[str] = []
    finish_reason = ""
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        text = getattr(delta, "content", None)
        if isinstance(text, str) and text:
            content.append(clean_provider_text(text))
        reason = getattr(choice, "finish_reason", None)
        if reason:
            finish_reason = _provider_message(reason, 32)
    return "".join(content), finish_reason, _reported_usage(getattr(chunk, "usage", None))


def _retry_hint(exc: openai.APIStatusError) -> str:
    """The sentence ``" Retry after N s."`` when a 429/503 answer carries a numeric
    Retry-After header (RFC 9110 section 10.2.3; an HTTP-date is left out), else ``""``."""
    if exc.status_code not in (429, 503):
        return ""
    value = (exc.response.headers.get("retry-after") or "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return ""
    return f" Retry after {seconds:g} s." if 0 <= seconds < 86400 else ""


# After finish_reason and usage, how long (s) to wait for [DONE] before ending the run as
# completed anyway (at most CHAT_STREAM_IDLE_TIMEOUT_S). Providers send [DONE] in the same
# write as the usage chunk; the wait only keeps the connection reusable.
_DONE_GRACE_S = 2.0


class UpstreamTimeout(Exception):
    """The provider did not start answering, or went silent, for too long (the
    message says which; settings OPENAI_FIRST_BYTE_TIMEOUT_S, CHAT_STREAM_IDLE_TIMEOUT_S)."""


# --- preparing a run (database, synchronous) ------------------------------------------
@dataclass
class PreparedRun:
    """What prepare_run saved and what the upstream request needs: dict shapes are
    ``Conversation.to_dict()`` / ``Message.to_dict()``; ``max_tokens`` in tokens."""

    user_id: int
    conversation: dict
    user_message: dict | None
    assistant_message: dict
    model: str
    prompt: list[dict]
    max_tokens: int
    # generation.end frames of stale runs of this conversation finished on the way.
    stale_ends: list[dict] = field(default_factory=list)
    # autostop hook: the run's automatic stops (repetition guard, cost ceiling).
    autostop: autostop.AutoStop = field(default_factory=autostop.AutoStop)


def build_prompt(conversation: Conversation) -> list[dict]:
    """System prompt plus the visible history, trimmed from the oldest message so the
    prompt fits ``CHAT_CONTEXT_TOKENS - CHAT_MAX_TOKENS`` tokens.

    Partial answers of stopped runs are kept (the user saw them); failed answers with no
    text and streaming rows are left out. Raises InvalidRequest when even the newest
    user message alone does not fit.
    """
    system = conversation.system_prompt or settings.CHAT_SYSTEM_PROMPT
    budget = settings.CHAT_CONTEXT_TOKENS - settings.CHAT_MAX_TOKENS
    budget -= accounting.count_prompt_tokens([{"role": "system", "content": system}])
    history = (
        conversation.messages.visible()
        .exclude(status=Message.Status.STREAMING)
        .exclude(content="")
        .filter(role__in=[Message.Role.USER, Message.Role.ASSISTANT])
        .order_by("-created_at")
        .values_list("role", "content")
    )
    kept: list[dict] = []
    for role, content in history:
        cost = accounting.TOKENS_PER_MESSAGE + accounting.count_tokens(content)
        if cost > budget:
            break
        budget -= cost
        kept.append({"role": role, "content": content})
    if not kept:
        raise InvalidRequest("The message is too long for the model's context window.")
    return [{"role": "system", "content": system}, *reversed(kept)]


def validate_model(model: str | None) -> str:
    """The model to use: ``model`` if allowed (``settings.CHAT_MODELS``), the default
    when empty. Raises InvalidRequest for a model the server does not allow."""
    if not model:
        return settings.CHAT_MODEL
    if model not in settings.CHAT_MODELS:
        raise InvalidRequest(f"Model {model!r} is not available here.")
    return model


def _lock_conversation(user, conversation_id, *, create: dict | None) -> Conversation | None:
    """The conversation row, locked for this transaction (PostgreSQL row lock; SQLite's
    IMMEDIATE transactions already serialise writers). When it does not exist and
    ``create`` is given (``{"model", "system_prompt"}``), it is created for ``user``."""
    conversation = Conversation.objects.select_for_update().filter(id=conversation_id).first()
    if conversation is None and create is not None:
        try:
            with transaction.atomic():  # a savepoint: the insert may lose a race
                conversation = Conversation.objects.create(
                    id=conversation_id,
                    owner=user,
                    model=validate_model(create.get("model")),
                    system_prompt=(create.get("system_prompt") or "").strip(),
                    **autostop.conversation_fields(create),  # autostop hook
                )
        except IntegrityError:
            # Another tab created it first; wait for its transaction and use its row.
            conversation = Conversation.objects.select_for_update().get(id=conversation_id)
    if conversation is not None and conversation.owner_id != user.id:
        raise Forbidden("This conversation belongs to someone else.")
    return conversation


def check_budget(user, conversation: Conversation, prompt_tokens: int, max_tokens: int) -> None:
    """Per-user budgets (see chat.budgets): raises QuotaExceeded or
    budgets.ConcurrencyLimit (a Busy)."""
    from . import budgets

    budgets.check(
        user, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        model=conversation.model or settings.CHAT_MODEL,
    )


def prepare_run(
    user, conversation_id, content: str | None, mode: str = "message", create: dict | None = None
) -> PreparedRun:
    """Save what the user asked and create the streaming assistant row, atomically.

    ``mode``: ``message`` (append ``content`` as a user message), ``regenerate`` (answer
    the last user message again; the old answer is kept but superseded) or ``edit``
    (replace the last user message by ``content``; it and its answer are superseded).
    ``create`` (``{"model", "system_prompt"}``, both optional) is used only when the
    message creates the conversation.
    Raises Forbidden, Busy, InvalidRequest or QuotaExceeded; then nothing is saved.
    """
    now = timezone.now()
    with transaction.atomic():
        conversation = _lock_conversation(
            user, conversation_id, create=(create or {}) if mode == "message" else None
        )
        if conversation is None:
            raise InvalidRequest("This conversation has no messages yet.")
        stale_ends = finish_stale(conversation_id=conversation.id)
        if conversation.messages.streaming().exists():
            raise Busy("A generation is already running in this conversation.")
        visible = conversation.messages.visible()
        last_user = visible.filter(role=Message.Role.USER).order_by("-created_at").first()
        user_message = None
        if mode in ("regenerate", "edit"):
            if last_user is None:
                raise InvalidRequest("There is no user message to answer again.")
            visible.filter(created_at__gt=last_user.created_at).update(superseded=True)
        if mode == "edit":
            last_user.superseded = True
            last_user.save(update_fields=["superseded"])
        if mode in ("message", "edit"):
            user_message = Message.objects.create(
                conversation=conversation, role=Message.Role.USER, content=content,
                status=Message.Status.COMPLETED, created_at=now, completed_at=now,
            )
        if not conversation.title:
            conversation.title = Conversation.title_from(content or last_user.content)
        conversation.updated_at = now
        conversation.save(update_fields=["title", "updated_at"])
        prompt = build_prompt(conversation)
        model = conversation.model or settings.CHAT_MODEL
        prompt_tokens = accounting.count_prompt_tokens(prompt)
        # autostop hook: the run's automatic stops; with a ceiling the budget reserves
        # only what the answer may cost before it is stopped.
        stops = autostop.AutoStop.for_run(user, conversation, model=model,
                                          prompt_tokens=prompt_tokens)
        check_budget(user, conversation, prompt_tokens, stops.reserve(settings.CHAT_MAX_TOKENS))
        assistant = Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, content="",
            status=Message.Status.STREAMING, model=model, created_at=timezone.now(),
            heartbeat_at=now, worker=WORKER_ID,
        )
    return PreparedRun(
        user_id=user.id,
        conversation=conversation.to_dict(),
        user_message=user_message.to_dict() if user_message else None,
        assistant_message=assistant.to_dict(usage=None),
        model=model,
        prompt=prompt,
        max_tokens=settings.CHAT_MAX_TOKENS,
        stale_ends=stale_ends,
        autostop=stops,  # autostop hook
    )


# --- finishing a run (database, synchronous) ------------------------------------------
def finalize_message(
    message_id,
    *,
    user_id,
    conversation_id,
    model: str,
    content: str | None,
    status: str,
    finish_reason: str,
    error: str,
    prompt: list[dict] | None,
    usage: dict | None,
    ttft_ms: int | None,
    duration_ms: int,
    max_tokens: int | None = None,
) -> UsageRecord:
    """Write the final state of an assistant message and its one UsageRecord.

    ``usage`` is the API's report ({"prompt_tokens", "completion_tokens"}) or None, in
    which case the tokens are estimated from ``prompt`` and ``content`` and the record is
    marked ``estimated``. ``content`` None keeps the text saved so far (the last
    checkpoint): the fallback when the text itself cannot be saved (Generation._finish).
    ``finish_reason`` and ``max_tokens`` (the run's, None when unknown) are also kept on
    the record (the admin report's automatic stops and the tokens they saved).
    Idempotent: a message that already has its record keeps it.
    """
    with transaction.atomic():
        # Conversation first, then message: the order prepare_run and the lease sweeper
        # (chat.leases.finish_expired) lock in, so PostgreSQL cannot deadlock them.
        list(Conversation.objects.select_for_update().filter(id=conversation_id).values("id"))
        message = Message.objects.select_for_update().get(id=message_id)
        existing = UsageRecord.objects.filter(message_id=message_id).first()
        if existing is not None:
            return existing
        now = timezone.now()
        if content is not None:
            message.content = content
        content = message.content
        message.status = status
        message.finish_reason = finish_reason
        message.error = error
        message.completed_at = now
        message.heartbeat_at = now
        message.save(
            update_fields=[
                "content", "status", "finish_reason", "error", "completed_at", "heartbeat_at"
            ]
        )
        if usage is not None:
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            estimated = False
        else:
            prompt_tokens = accounting.count_prompt_tokens(prompt or [])
            completion_tokens = accounting.count_tokens(content)
            estimated = True
        prices = accounting.unit_prices(model)
        record = UsageRecord.objects.create(
            user_id=user_id,
            conversation_id=conversation_id,
            message=message,
            model=model,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            estimated=estimated,
            input_price_per_mtok=prices[0],
            output_price_per_mtok=prices[1],
            cost_usd=accounting.cost_usd(prompt_tokens, completion_tokens, prices),
            ttft_ms=ttft_ms,
            duration_ms=duration_ms,
            finish_reason=finish_reason,
            max_tokens=max_tokens,
        )
        Conversation.objects.filter(id=conversation_id).update(updated_at=now)
    return record


def finish_stale(conversation_id=None) -> list[dict]:
    """Mark streaming messages whose process stopped heartbeating as ``interrupted``
    (keeping their last checkpointed text) and give each its estimated UsageRecord.

    Returns the ``generation.end`` frames to publish, one per message finished (a
    message its own run finished meanwhile is left as it is and gets none).
    """
    stale = Message.objects.stale().select_related("conversation")
    if conversation_id is not None:
        stale = stale.filter(conversation_id=conversation_id)
    frames = []
    error = "The server process running this generation stopped responding."
    for message in stale:
        conversation = message.conversation
        now = timezone.now()
        duration_ms = int((now - message.created_at).total_seconds() * 1000)
        record = finalize_message(
            message.id,
            user_id=conversation.owner_id,
            conversation_id=conversation.id,
            model=message.model,
            content=None,  # the text of the last checkpoint, read under the row lock
            status=Message.Status.INTERRUPTED,
            finish_reason="error",
            error=error,
            prompt=build_prompt_safe(conversation, before=message.created_at),
            usage=None,
            ttft_ms=None,
            duration_ms=duration_ms,
        )
        if record.status != Message.Status.INTERRUPTED:
            continue
        frames.append(_end_frame(message.id, Message.Status.INTERRUPTED, "error",
                                 record.to_dict(), error))
        # What is known is the silence, not why: the worker may be alive but stalled
        # (a blocked event loop, a database it cannot reach), or this very process.
        silence = (
            f"no checkpoint for {(now - message.heartbeat_at).total_seconds():.0f} s"
            if message.heartbeat_at else "never checkpointed"
        )
        logger.warning(
            "generation %s interrupted: %s (lease %s s), worker %s%s",
            message.id, silence, settings.CHAT_LEASE_S, message.worker or "unknown",
            " (this process)" if message.worker == WORKER_ID else "",
        )
    return frames


def build_prompt_safe(conversation: Conversation, before) -> list[dict]:
    """The prompt a message was (probably) generated from, for usage estimates."""
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


def _end_frame(message_id, status, finish_reason, usage: dict, error: str | None) -> dict:
    return {
        "type": "generation.end",
        "message_id": str(message_id),
        "status": status,
        "finish_reason": finish_reason,
        "usage": usage,
        "error": error or None,
    }


def _checkpoint(message_id, content: str) -> None:
    """Save the text so far and refresh the lease; never touches a finalised row."""
    Message.objects.filter(id=message_id, status=Message.Status.STREAMING).update(
        content=content, heartbeat_at=timezone.now()
    )


# --- the running generation -----------------------------------------------------------
# Outbox marker: "a delta of the pending text goes here" (see Generation._flush).
_DELTA = object()


@dataclass
class Generation:
    """One streaming assistant answer, running as an asyncio task in this process.

    ``text`` is all content received from upstream; ``published_text``/``seq`` what has
    been sent as deltas (so a late joiner's snapshot is consistent with later deltas).
    """

    run: PreparedRun
    layer: object
    started_at: float = field(default_factory=time.monotonic)
    text: list[str] = field(default_factory=list)
    published_text: list[str] = field(default_factory=list)
    seq: int = 0
    status: str = Message.Status.STREAMING
    end_frame: dict | None = None
    task: asyncio.Task | None = None
    cancel_reason: str | None = None
    _pending: list[str] = field(default_factory=list)
    _flush_handle: asyncio.TimerHandle | None = None
    _outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    _delta_queued: bool = False
    _subscribers: list[asyncio.Queue] = field(default_factory=list)
    _finishing: bool = False
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _helpers: list[asyncio.Task] = field(default_factory=list)
    _control_channel: str | None = None
    # Set by fail(): the error the run ends with instead of `cancelled`.
    _failure: str | None = None

    @property
    def message_id(self) -> str:
        return self.run.assistant_message["id"]

    @property
    def conversation_id(self) -> str:
        return self.run.conversation["id"]

    # -- public API ---------------------------------------------------------------
    def cancel(self, reason: str = "stop") -> bool:
        """Cancel the task (idempotent). Returns False when it was already ending.

        A run still being launched is cancelled as soon as its task exists, and a task
        that has not taken its first step yet just after that step: a task cancelled
        before its first step never runs its body, so it would end without its
        ``generation.end``, its usage record, or releasing its channels."""
        if self._finishing or self.cancel_reason or (self.task is not None and self.task.done()):
            return False
        self.cancel_reason = reason
        if self.task is not None:
            self._cancel_task()
        return True

    def _cancel_task(self) -> None:
        if inspect.getcoroutinestate(self.task.get_coro()) == inspect.CORO_CREATED:
            # Its first step is already scheduled; this runs after it.
            self.task.get_loop().call_soon(self.task.cancel)
        else:
            self.task.cancel()

    def snapshot(self) -> dict:
        """``{"message_id", "content", "seq"}``: text of every delta up to ``seq``."""
        return {
            "message_id": self.message_id,
            "content": "".join(self.published_text),
            "seq": self.seq,
        }

    def subscribe(self) -> asyncio.Queue:
        """A queue that receives every frame published from now on, in order, ending
        with ``generation.end``."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    async def wait(self) -> dict:
        """Wait until the run has ended and its frames are published; returns the
        ``generation.end`` frame. Cancelling the waiter does not cancel the run."""
        await self._done.wait()
        return self.end_frame

    # -- publishing ---------------------------------------------------------------
    def publish(self, frame: dict) -> None:
        """Queue a frame for the group and the local subscribers, keeping order."""
        self._outbox.put_nowait(frame)

    async def _publisher(self) -> None:
        group = group_name(self.conversation_id)
        while True:
            frame = await self._outbox.get()
            try:
                if frame is None:
                    return
                if frame is _DELTA:
                    frame = self._take_delta()
                    if frame is None:
                        continue
                for queue in self._subscribers:
                    queue.put_nowait(frame)
                try:
                    await self.layer.group_send(group, {"type": "chat.frame", "frame": frame})
                except Exception:  # noqa: BLE001 - a layer hiccup must not kill the run
                    logger.exception("group_send failed for %s", self.message_id)
            finally:
                self._outbox.task_done()

    def _append(self, content: str) -> None:
        self.text.append(content)
        self._pending.append(content)
        if self._flush_handle is None:
            window = settings.CHAT_DELTA_COALESCE_MS / 1000
            self._flush_handle = asyncio.get_running_loop().call_later(window, self._flush)

    def _flush(self) -> None:
        """Queue a delta of the pending text (at most one queued at a time).

        The delta's content and seq are taken when the publisher reaches it, not now: if
        the channel layer is slower than the stream, text piling up meanwhile goes out
        as one larger delta instead of a growing queue of small ones (coalescing that
        adapts to load; docs/scale.md has the figures)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending or self._delta_queued:
            return
        self._delta_queued = True
        self.publish(_DELTA)

    def _take_delta(self) -> dict | None:
        """The delta frame of all pending text, numbered now; None when none is left."""
        self._delta_queued = False
        if not self._pending:
            return None
        content = "".join(self._pending)
        self._pending.clear()
        self.seq += 1
        self.published_text.append(content)
        return {"type": "delta", "message_id": self.message_id, "seq": self.seq, "content": content}

    # -- background helpers --------------------------------------------------------
    async def _control(self) -> None:
        channel = self._control_channel
        try:
            while True:
                message = await self.layer.receive(channel)
                kind = message.get("type")
                # Only the run's owner may stop it or read it (request_stop,
                # request_snapshot): the control group is reachable by any process.
                if message.get("user_id") != self.run.user_id:
                    continue
                if kind == "generation.stop":
                    if message.get("message_id") in (None, self.message_id):
                        self.cancel(message.get("reason") or "stop")
                elif kind == "generation.sync" and message.get("reply_channel"):
                    await self.layer.send(
                        message["reply_channel"],
                        {"type": "generation.snapshot", "generation": self.snapshot()},
                    )
        finally:
            # Cancelled while answering a sync, the layer would keep it subscribed.
            await release_channel(self.layer, channel)

    # -- the task -----------------------------------------------------------------
    async def _run(self) -> None:
        usage = None
        finish_reason = ""
        error = ""
        ttft_ms = None
        status = Message.Status.COMPLETED
        cancelled = False
        try:
            client = await get_client()
            first_byte_s = settings.OPENAI_FIRST_BYTE_TIMEOUT_S
            idle_s = settings.CHAT_STREAM_IDLE_TIMEOUT_S
            try:
                # create() returns once the response headers are in; the SDK's retries
                # (429, 5xx, a dropped connection) spend the same budget.
                async with asyncio.timeout(first_byte_s):
                    stream = await client.chat.completions.create(
                        model=self.run.model,
                        messages=self.run.prompt,
                        stream=True,
                        stream_options={"include_usage": True},
                        max_tokens=self.run.max_tokens,
                    )
            except TimeoutError:
                raise UpstreamTimeout(
                    f"The model provider did not start answering within {first_byte_s:g} s."
                ) from None
            # `async with` closes the HTTP response on every exit, including a
            # CancelledError raised at any await inside the block.
            async with stream:
                chunks = aiter(stream)
                while True:
                    # Once finish_reason and usage are both in, the answer is whole:
                    # [DONE] gets a short grace, and whatever follows (silence, a cut
                    # connection, garbage) cannot turn it into a failure.
                    whole = bool(finish_reason) and usage is not None
                    try:
                        async with asyncio.timeout(
                            min(_DONE_GRACE_S, idle_s) if whole else idle_s
                        ):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        if whole:
                            logger.info("generation %s: no [DONE] after its usage; "
                                        "ending it as completed", self.message_id)
                            break
                        raise UpstreamTimeout(
                            f"The model provider sent nothing for {idle_s:g} s."
                        ) from None
                    except Exception:
                        if whole:
                            logger.info("generation %s: stream broke after its usage; "
                                        "ending it as completed", self.message_id,
                                        exc_info=True)
                            break
                        raise
                    content, reason, reported = _read_chunk(chunk)
                    if reported is not None:
                        usage = reported
                    if content:
                        if ttft_ms is None:
                            ttft_ms = int((time.monotonic() - self.started_at) * 1000)
                        self._append(content)
                        # autostop hook: a rule that fires stops the run as a stop frame
                        # does; the cancellation lands at this await, before any read.
                        if self.run.autostop.check(content) and self.cancel(
                            self.run.autostop.reason
                        ):
                            await asyncio.sleep(0)
                    if reason:
                        finish_reason = reason
                    if self._outbox.qsize() >= settings.CHAT_OUTBOX_LIMIT:
                        # Back-pressure: a slow channel layer slows our reading (and so
                        # the provider, through TCP) instead of growing memory.
                        await self._outbox.join()
            if not finish_reason:
                # A clean end of the HTTP body without a finish_reason: the provider
                # (or a proxy) cut the answer short.
                status, finish_reason = Message.Status.FAILED, "error"
                error = "The model provider ended the answer before it was complete."
        except asyncio.CancelledError:
            if self._failure is None:
                cancelled = True
                # autostop hook: `repetition`/`cost_limit` when a rule stopped it.
                status = Message.Status.CANCELLED
                finish_reason = autostop.finish_reason_for(self.cancel_reason)
            else:  # Generation.fail: a run this process had to end
                status, finish_reason, error = Message.Status.FAILED, "error", self._failure
        except UpstreamTimeout as exc:
            status, finish_reason, error = Message.Status.FAILED, "error", str(exc)
        except openai.APIStatusError as exc:
            status, finish_reason = Message.Status.FAILED, "error"
            error = (
                f"The model provider answered HTTP {exc.status_code}: "
                f"{_provider_message(_api_message(exc))}{_retry_hint(exc)}"
            )
        except openai.APITimeoutError:
            status, finish_reason = Message.Status.FAILED, "error"
            error = "The model provider did not answer in time."
        except openai.APIConnectionError:
            status, finish_reason = Message.Status.FAILED, "error"
            error = "The connection to the model provider was lost."
        except openai.APIError as exc:
            # An {"error": {...}} event in the stream (the SDK raises it as APIError).
            status, finish_reason = Message.Status.FAILED, "error"
            error = f"The model provider reported an error: {_provider_message(exc.message)}"
        except json.JSONDecodeError:
            logger.warning("generation %s: the provider sent a chunk that is not JSON",
                           self.message_id)
            status, finish_reason = Message.Status.FAILED, "error"
            error = "The model provider sent a malformed chunk."
        except Exception as exc:  # noqa: BLE001 - any failure ends the run as failed
            logger.exception("generation %s failed", self.message_id)
            status, finish_reason = Message.Status.FAILED, "error"
            error = f"The generation failed ({type(exc).__name__})."
        # Usage the provider reported is kept whatever the end: it is what was billed.
        await self._finish(status, finish_reason or "stop", error, usage, ttft_ms)
        if cancelled:
            raise asyncio.CancelledError

    def fail(self, error: str) -> bool:
        """End the run as ``failed`` with ``error`` (shown to the user), closing the
        upstream stream as a stop does; for a run this process cannot carry on (its
        text cannot be saved: chat.leases.checkpoint_running). Returns False when the
        run was already ending."""
        if self._finishing or self.task is None or self.task.done() or self.cancel_reason:
            return False
        self.cancel_reason = "failed"
        self._failure = error
        self.task.cancel()
        return True

    async def _finish(self, status, finish_reason, error, usage, ttft_ms) -> None:
        self._finishing = True
        try:
            for helper in self._helpers:
                helper.cancel()
            await asyncio.gather(*self._helpers, return_exceptions=True)
            self._flush()
            self.status = status
            duration_ms = int((time.monotonic() - self.started_at) * 1000)
            content = "".join(self.text)
            save = database_sync_to_async(finalize_message, thread_sensitive=False)
            common = {
                "user_id": self.run.user_id, "conversation_id": self.conversation_id,
                "model": self.run.model, "prompt": self.run.prompt, "usage": usage,
                "ttft_ms": ttft_ms, "duration_ms": duration_ms,
                "max_tokens": self.run.max_tokens,
            }
            record = None
            try:
                record = await save(
                    self.message_id, content=content, status=status,
                    finish_reason=finish_reason, error=error, **common,
                )
            except Exception as exc:  # noqa: BLE001
                logger.exception("could not save the end of generation %s", self.message_id)
                # Never tell the tabs an answer ended well when it is not saved: save it
                # as failed, with its text, or else with the last checkpointed text (the
                # text may be what the database refused). A row left streaming would
                # answer `busy` until its lease expired.
                status, finish_reason = Message.Status.FAILED, "error"
                error = f"The answer could not be saved ({type(exc).__name__})."
                for kept, note in ((content, ""), (None, " Only its last saved part is kept.")):
                    try:
                        record = await save(
                            self.message_id, content=kept, status=status,
                            finish_reason=finish_reason, error=error + note, **common,
                        )
                        error += note
                        break
                    except Exception:  # noqa: BLE001
                        logger.exception("could not save generation %s as failed",
                                         self.message_id)
            self.status = status
            usage_dict = None
            if record is not None:
                usage_dict = record.to_dict()
                if record.status != status:
                    # Finished elsewhere (a lease sweep): report the recorded end.
                    status = self.status = record.status
                    finish_reason, error = "error", "The generation lost its lease."
            self.end_frame = _end_frame(self.message_id, status, finish_reason, usage_dict, error)
            self.publish(self.end_frame)
            self.publish(None)
            await self._publisher_task
        finally:
            _running.pop(uuid.UUID(self.conversation_id), None)
            if self._control_channel:
                try:
                    await self.layer.group_discard(
                        control_group_name(self.conversation_id), self._control_channel
                    )
                except Exception:  # noqa: BLE001
                    logger.exception("group_discard failed")
            self._done.set()
            logger.info(
                "generation %s %s after %d ms (%s)",
                self.message_id, status, int((time.monotonic() - self.started_at) * 1000),
                autostop.describe_end(finish_reason, self.cancel_reason),
            )

    async def _launch(self) -> None:
        """Start the publisher, control listener, the checkpointer and the run task."""
        # Fresh contexts: these tasks outlive the caller, and a caller inside a request
        # (an async view under a sync middleware) carries asgiref's per-request
        # executor in its context, which quits when the request ends.
        self._publisher_task = asyncio.create_task(self._publisher(), context=Context())
        try:
            # The default prefix on purpose: channels-redis polls one Redis list per
            # prefix and process, so a second prefix would starve the consumers' channels.
            self._control_channel = await self.layer.new_channel()
            await self.layer.group_add(
                control_group_name(self.conversation_id), self._control_channel
            )
        except BaseException:
            self._publisher_task.cancel()
            await release_channel(self.layer, self._control_channel)
            raise
        # Checkpoints and lease heartbeats of every run of this process are written
        # together, in one statement per interval (chat.leases.checkpoint_running).
        from .leases import ensure_checkpointer

        ensure_checkpointer()
        self._helpers = [asyncio.create_task(self._control(), context=Context())]
        self.task = asyncio.create_task(
            self._run(), name=f"generation-{self.message_id}", context=Context()
        )
        self.task.add_done_callback(_log_task_end)
        if self.cancel_reason:
            self._cancel_task()  # cancelled while launching


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message") if body else None
    return str(message or exc.message)[:300]


def _log_task_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("generation task crashed", exc_info=task.exception())


# --- entry points ---------------------------------------------------------------------
async def start_generation(
    user,
    conversation_id,
    content: str | None = None,
    *,
    mode: str = "message",
    create: dict | None = None,
    layer=None,
) -> Generation:
    """Save the user's message, create the assistant row and start streaming.

    ``create``: ``{"model", "system_prompt"}`` for a conversation this message creates.
    Returns the running :class:`Generation` (its frames already queued: ``message``
    unless regenerating, then ``generation.start``). Raises :class:`GenerationError`
    subclasses (Forbidden, Busy, InvalidRequest, QuotaExceeded) before anything is sent
    upstream; nothing is saved then. Text follows chat.validation (lone surrogates
    refused, NUL dropped), whichever door it came through.
    """
    if mode not in ("message", "regenerate", "edit"):
        raise InvalidRequest(f"Unknown mode {mode!r}.")
    try:
        if mode != "regenerate":
            content = validation.clean_text(
                content or "", max_chars=settings.CHAT_MAX_MESSAGE_CHARS
            ).strip()
        if create and create.get("system_prompt") is not None:
            create = {**create, "system_prompt": validation.clean_text(
                create["system_prompt"], max_chars=settings.CHAT_MAX_MESSAGE_CHARS,
                required=False, name="system_prompt",
            )}
    except validation.TextRejected as exc:
        raise InvalidRequest(exc.message) from None
    from .leases import ensure_sweeper

    ensure_sweeper(layer)
    # Not thread-sensitive: self-contained transactions may run in the executor's
    # threads, beside the one thread Channels gives session and user loading (under
    # load that thread was the queue new sockets waited in; docs/scale.md).
    run = await database_sync_to_async(prepare_run, thread_sensitive=False)(
        user, conversation_id, content, mode, create
    )
    generation = Generation(run=run, layer=layer or get_channel_layer())
    _running[uuid.UUID(run.conversation["id"])] = generation
    # Straight to the group, not through the run's outbox: its subscribers (an SSE
    # client) wait for *their* generation.end.
    for frame in run.stale_ends:
        await generation.layer.group_send(
            group_name(run.conversation["id"]), {"type": "chat.frame", "frame": frame}
        )
    if run.user_message is not None:
        generation.publish(
            {"type": "message", "message": run.user_message, "conversation": run.conversation}
        )
    generation.publish({"type": "generation.start", "message": run.assistant_message})
    # Shielded: a caller cancelled now (its socket torn down) must not leave a run half
    # wired (channels subscribed, row streaming, no task); it is stopped once launched.
    launch = asyncio.ensure_future(generation._launch())
    try:
        await asyncio.shield(launch)
    except asyncio.CancelledError:
        launch.add_done_callback(lambda _: _after_launch(generation, launch, "disconnect"))
        raise
    except BaseException:
        _after_launch(generation, launch, None)
        raise
    return generation


def _after_launch(generation: Generation, launch: asyncio.Future, cancel: str | None) -> None:
    """A launch whose caller went away: forget a run that did not launch, and cancel
    (reason ``cancel``) one that did."""
    if launch.cancelled() or launch.exception() is not None:
        _running.pop(uuid.UUID(generation.conversation_id), None)
    elif cancel:
        generation.cancel(cancel)


async def request_stop(
    conversation_id, *, user_id: int, reason: str = "stop", layer=None
) -> bool:
    """Stop the running generation of a conversation, in whichever process it runs, if
    ``user_id`` (the requesting user's id) owns it.

    Cancels it directly when it runs here and is the requester's (returns True); a run
    here of another user is left alone (returns False). Otherwise sends
    ``generation.stop`` with ``user_id`` to the conversation's control group, whose run
    checks the owner itself (returns False: whether a generation was running elsewhere
    is not known here). The owner is checked here, where the run is stopped, and not
    only by the caller (issue 9, item 1: a refused socket could stop others' runs).
    """
    generation = running_generation(conversation_id)
    if generation is not None:
        if generation.run.user_id != user_id:
            logger.warning(
                "user %s may not stop generation %s", user_id, generation.message_id
            )
            return False
        generation.cancel(reason)
        return True
    layer = layer or get_channel_layer()
    await layer.group_send(
        control_group_name(conversation_id),
        {"type": "generation.stop", "reason": reason, "user_id": user_id},
    )
    return False


async def request_snapshot(
    conversation_id, reply_channel: str, *, user_id: int, layer=None
) -> dict | None:
    """The text so far of the conversation's running generation, for its owner
    ``user_id`` only.

    Answers at once (returns the snapshot) when it runs in this process; otherwise asks
    the owning process to send ``{"type": "generation.snapshot", "generation": {...}}``
    to ``reply_channel`` (which it does only if ``user_id`` owns the run) and returns
    None. Another user's run here gets None and no request.
    """
    generation = running_generation(conversation_id)
    if generation is not None and generation.run.user_id != user_id:
        return None
    if generation is not None and not generation._finishing:
        return generation.snapshot()
    layer = layer or get_channel_layer()
    await layer.group_send(
        control_group_name(conversation_id),
        {"type": "generation.sync", "reply_channel": reply_channel, "user_id": user_id},
    )
    return None


def load_state(user, conversation_id) -> dict:
    """What a newly connected socket needs: the conversation (or None if not created),
    its visible messages, and the streaming assistant message if any (as saved at the
    last checkpoint). Raises Forbidden for another user's conversation."""
    conversation = Conversation.objects.filter(id=conversation_id).first()
    if conversation is None:
        return {"conversation": None, "messages": [], "streaming": None}
    if conversation.owner_id != user.id:
        raise Forbidden("This conversation belongs to someone else.")
    messages = list(
        conversation.messages.visible().select_related("usage").order_by("created_at")
    )
    streaming = next((m for m in messages if m.status == Message.Status.STREAMING), None)
    return {
        "conversation": conversation.to_dict(),
        "messages": [m.to_dict() for m in messages],
        "streaming": streaming.to_dict() if streaming else None,
    }
