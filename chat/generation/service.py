"""The entry points callers use: start a run, stop it, read it, in whichever process
it runs. Consumers and API views call these (through ``chat.generation``); they tie the
store (the transactions), the task (chat.generation.task) and the leases together.

Who may act: only a run's owner may stop it or read its snapshot, checked here where
the run is (and by the run's control listener for requests from other processes), not
only by the caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid

from asgiref.sync import ThreadSensitiveContext
from channels.layers import get_channel_layer
from django.conf import settings

from .. import metrics, validation
from . import admission, frames, leases
from .errors import InvalidRequest
from .runtime import Runtime
from .startqueue import StartRequest
from .task import Generation

logger = logging.getLogger(__name__)

MODES = ("message", "regenerate", "edit")


def running_generation(conversation_id) -> Generation | None:
    """The generation of the conversation running on this event loop, if any."""
    return Runtime.current().get(conversation_id)


async def send_to_group(conversation_id, frame: dict, *, layer=None) -> None:
    """Send ``frame`` (a chat.generation.frames dict) to every socket of the
    conversation: this process's directly, other processes' through the channel layer
    (chat.generation.fanout). Raises what the channel layer raises."""
    await Runtime.current().fanout.publish(conversation_id, frame, layer or get_channel_layer())


# The name callers of the old module knew.
broadcast = send_to_group


async def watch(conversation_id, inbox, *, layer=None) -> None:
    """Give ``inbox`` (a fanout.Inbox) every frame of the conversation from now on, in
    whichever process it is published (Fanout.watch). Raises what the layer raises."""
    await Runtime.current().fanout.watch(conversation_id, inbox, layer or get_channel_layer())


async def unwatch(conversation_id, inbox) -> None:
    """Stop ``inbox``'s frames (idempotent, never raises)."""
    await Runtime.current().fanout.unwatch(conversation_id, inbox)


def _clean_input(mode: str, content: str | None, create: dict | None):
    """``(content, create)`` after chat.validation's text rules; raises InvalidRequest."""
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
    return content, create


async def start_generation(
    user,
    conversation_id,
    content: str | None = None,
    *,
    mode: str = "message",
    create: dict | None = None,
    layer=None,
    tab: str | None = None,
) -> Generation:
    """Save the user's message, create the assistant row and start streaming.

    ``mode``: ``message``, ``regenerate`` or ``edit`` (store.prepare_*). ``create``:
    ``{"model", "system_prompt"}`` for a conversation this message creates. ``tab``:
    the id of the browser tab starting it (request_stop with ``tab``).
    Returns the running :class:`Generation` (its frames already queued: ``message``
    unless regenerating, then ``generation.start``). Raises GenerationError subclasses
    (Forbidden, Busy, InvalidRequest, QuotaExceeded, Overloaded: this worker is past
    its capacity, chat.generation.admission) before anything is sent upstream;
    nothing is saved then. Text follows chat.validation (lone surrogates
    refused, NUL dropped), whichever door it came through.
    """
    if mode not in MODES:
        raise InvalidRequest(f"Unknown mode {mode!r}.")
    try:
        # One spelling of the id: a batch of starts looks conversations up by it.
        conversation_id = uuid.UUID(str(conversation_id))
    except ValueError:
        raise InvalidRequest("The conversation id is not a UUID.") from None
    content, create = _clean_input(mode, content, create)
    # Before the database: a refused message leaves no row (no orphan user message).
    admission.admit()
    leases.ensure_sweeper(layer)
    runtime = Runtime.current()
    # Counted from admission to the end of its transaction (admission's "starts").
    start = runtime.start_began()
    # The start waits for the transaction of its batch (chat.generation.startqueue): the
    # starts waiting together are committed together, in one of the executor's threads,
    # not the one thread Channels gives session and user loading (under load that
    # thread was the queue new sockets waited in; docs/scale.md).
    try:
        run = await runtime.start_queue.submit(StartRequest(
            user, conversation_id, content, mode=mode, create=create))
    finally:
        runtime.start_ended(start)
    metrics.run_started(run.model)
    generation = Generation(run=run, layer=layer or get_channel_layer(), runtime=runtime,
                            tab=tab)
    runtime.add(generation)
    # Straight to the group, not through the run's outbox: its subscribers (an SSE
    # client) wait for *their* generation.end.
    for frame in run.stale_ends:
        await send_to_group(run.conversation["id"], frame, layer=generation.layer)
    if run.user_message is not None:
        generation.publish(frames.user_message(run.user_message, run.conversation))
    generation.publish(frames.generation_start(run.assistant_message))
    # Checkpoints and lease heartbeats of every run of this loop are written together,
    # in one statement per interval (leases.checkpoint_running).
    leases.ensure_checkpointer()
    # Shielded: a caller cancelled now (its socket torn down) must not leave a run half
    # wired (channels subscribed, row streaming, no task); it is stopped once launched.
    launch = asyncio.ensure_future(generation.launch())
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
    if not launch.done():
        return
    if launch.cancelled() or launch.exception() is not None:
        generation.runtime.discard(generation)
    elif cancel:
        generation.cancel(cancel)


async def request_stop(
    conversation_id, *, user_id: int, reason: str = "stop", layer=None, tab: str | None = None
) -> bool:
    """Stop the running generation of a conversation, in whichever process it runs, if
    ``user_id`` (the requesting user's id) owns it.

    Cancels it directly when it runs here and is the requester's (returns True); a run
    here of another user is left alone (returns False). Otherwise sends
    ``generation.stop`` with ``user_id`` to the conversation's control group, whose run
    checks the owner itself (returns False: whether a generation was running elsewhere
    is not known here). With ``tab``, only a run that browser tab started is stopped
    (a tab's disconnect, on any worker).
    """
    generation = running_generation(conversation_id)
    if generation is not None:
        if tab is not None and generation.tab != tab:
            return False
        if generation.run.user_id != user_id:
            logger.warning(
                "user %s may not stop generation %s", user_id, generation.message_id
            )
            return False
        generation.cancel(reason)
        return True
    layer = layer or get_channel_layer()
    await layer.group_send(frames.control_group_name(conversation_id),
                           frames.stop_request(user_id, reason, tab, at=time.time()))
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
    if generation is not None and not generation.finishing:
        return generation.snapshot()
    layer = layer or get_channel_layer()
    await layer.group_send(
        frames.control_group_name(conversation_id), frames.sync_request(user_id, reply_channel)
    )
    return None


async def start_detached(user, conversation_id, content):
    """``start_generation`` in a task of its own that outlives the request, with its
    own asgiref thread for database calls until the run has ended (the SSE view).

    Why: a sync-only middleware (WhiteNoise) makes Django call an async view through
    ``async_to_sync`` from a request thread; a task created there would inherit that
    thread's executor (``AsyncToSync.executors.current``) and its database calls would
    fail with "CurrentThreadExecutor already quit" once the request is over (an SSE
    client that disconnected, say), or deadlock in-process. A fresh context and a
    ``ThreadSensitiveContext`` held open until the run ends avoid both.
    Returns ``(generation, queue)``, the queue subscribed before any await so that no
    delta can be missed. Raises what start_generation raises. If the caller is
    cancelled before the run started, the run is cancelled as soon as it exists.
    """
    started: asyncio.Future = asyncio.get_running_loop().create_future()

    async def owner():
        async with ThreadSensitiveContext():
            try:
                generation = await start_generation(user, conversation_id, content)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting view
                if not started.done():
                    started.set_exception(exc)
                return
            started.set_result((generation, generation.subscribe()))
            await generation.wait()

    task = asyncio.create_task(owner(), context=contextvars.Context())
    Runtime.current().keep(task)
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_cancel_started)
        raise


def _cancel_started(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[0].cancel("disconnect")
