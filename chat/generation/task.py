"""One running generation: its asyncio task, cancellation, delta coalescing and the
publishing of its frames, in order, to the conversation's group and local subscribers.

The task reads the StreamEvents of the configured provider (chat.generation.providers),
produces one Outcome and hands it to ``store.finalize``: one ``generation.end`` and one
UsageRecord per run, whatever its end (a run handed over ends on the worker that takes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from contextvars import Context
from dataclasses import dataclass, field

from channels.db import database_sync_to_async
from django.conf import settings

from .. import metrics
from ..layers import release_channel
from ..models import Message
from . import counting, frames, handover, store
from .autostop import describe_end
from .outcome import Outcome, outcome_of
from .providers import StreamMeta, StreamRequest
from .runtime import Runtime

logger = logging.getLogger(__name__)

# Outbox marker: "the frames of the pending text go here" (see Generation._flush).
_DELTA = object()
# Kinds of pending text, in the order received: answer text and reasoning text.
_CONTENT, _REASONING = "content", "reasoning"


@dataclass
class Generation:
    """One streaming assistant answer, running as an asyncio task of ``runtime``'s loop.

    ``text`` is all content received from upstream, ``reasoning`` all reasoning text;
    ``published_text``/``published_reasoning``/``seq`` what has been sent as delta and
    reasoning frames, one seq series for both (so a late joiner's snapshot is
    consistent with later frames).
    """

    run: store.PreparedRun
    layer: object
    runtime: Runtime
    started_at: float = field(default_factory=time.monotonic)
    text: list[str] = field(default_factory=list)
    published_text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    published_reasoning: list[str] = field(default_factory=list)
    seq: int = 0
    status: str = Message.Status.STREAMING
    end_frame: dict | None = None
    task: asyncio.Task | None = None
    cancel_reason: str | None = None
    # The browser tab that started the run (the socket URL's ``tab``), or None: its
    # disconnect stops the run on whichever worker that tab's socket was.
    tab: str | None = None
    # (len(text), len(reasoning)) at the last saved checkpoint (chat.generation.leases).
    checkpoint_mark: tuple[int, int] | None = None
    resume_at: tuple[str, int] | None = None  # (response id, seq no.): Provider.resume it
    # (seq no., len(text), len(reasoning)) after the last event none of whose text key
    # masking held back: where another worker resumes from (handover.checkpoint_of).
    resume_mark: tuple[int, int, int] | None = None
    _pending: list[tuple[str, str]] = field(default_factory=list)
    _pending_chars: int = 0
    _flush_handle: asyncio.TimerHandle | None = None
    _outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    _delta_queued: bool = False
    _subscribers: list[asyncio.Queue] = field(default_factory=list)
    _finishing: bool = False
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _helpers: list[asyncio.Task] = field(default_factory=list)
    _control_channel: str | None = None
    _publisher_task: asyncio.Task | None = None
    # Set by fail(): the error the run ends with instead of `cancelled`.
    _failure: str | None = None
    # What the provider tells of its stream (filled in as it goes).
    _meta: StreamMeta = field(default_factory=StreamMeta)
    # chat.metrics: when a stop reached the run (time.monotonic(); None once its upstream
    # is closed) and when the oldest pending text arrived.
    _stop_at: float | None = None
    _pending_since: float = 0.0

    @property
    def message_id(self) -> str:
        return self.run.assistant_message["id"]

    @property
    def conversation_id(self) -> str:
        return self.run.conversation["id"]

    @property
    def finishing(self) -> bool:
        """True once the run has begun ending (its text is final)."""
        return self._finishing

    @property
    def queued_frames(self) -> int:
        """Frames waiting to be published (local sockets get them without waiting; the
        channel layer, for other processes, may make them wait); the run stops reading
        upstream at ``CHAT_TUNING.outbox_limit`` until they are sent (back-pressure)."""
        return self._outbox.qsize()

    def is_streaming(self) -> bool:
        """Launched and neither done nor ending: its text may still grow."""
        return self.task is not None and not self.task.done() and not self._finishing

    # -- public API ---------------------------------------------------------------
    def cancel(self, reason: str = "stop", requested_at: float | None = None) -> bool:
        """Cancel the task (idempotent; ``requested_at``: metrics.stop_began). Returns
        False when it was already ending.

        A run still being launched is cancelled once its task exists, and a task not yet
        past its first step just after it: one cancelled before never runs its body (no
        ``generation.end``, no usage record, its channels never released)."""
        if self._finishing or self.cancel_reason or (self.task is not None and self.task.done()):
            return False
        self.cancel_reason = reason
        self._stop_at = metrics.stop_began(requested_at)
        self._hang_up()
        if self.task is not None:
            self._cancel_task()
        return True

    def fail(self, error: str) -> bool:
        """End the run as ``failed`` with ``error`` (shown to the user), closing the
        upstream stream as a stop does; for a run this process cannot carry on (its
        text cannot be saved: chat.generation.leases.checkpoint_running). Returns False
        when the run was already ending."""
        if self._finishing or self.task is None or self.task.done() or self.cancel_reason:
            return False
        self.cancel_reason = "failed"
        self._failure = error
        self._hang_up()
        self.task.cancel()
        return True

    def _hang_up(self) -> None:
        # The provider hears of the stop now; the task, cancelled next, reads what arrived.
        hang_up = self._meta.hang_up
        if hang_up is not None:
            hang_up()
            metrics.stop_reached_upstream(self._stop_at)
            self._stop_at = None

    def _cancel_task(self) -> None:
        if inspect.getcoroutinestate(self.task.get_coro()) == inspect.CORO_CREATED:
            # Its first step is already scheduled; this runs after it.
            self.task.get_loop().call_soon(self.task.cancel)
        else:
            self.task.cancel()

    def snapshot(self) -> dict:
        """``{"message_id", "content", "reasoning", "seq"}``: text of every delta and
        reasoning frame up to ``seq``."""
        return frames.snapshot(self.message_id, "".join(self.published_text), self.seq,
                               "".join(self.published_reasoning))

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
        while True:
            item = await self._outbox.get()
            try:
                if item is None:
                    return
                for frame in self._take_frames() if item is _DELTA else [item]:
                    for queue in self._subscribers:
                        queue.put_nowait(frame)
                    try:
                        # This process's sockets at once; the layer only for other processes.
                        await self.runtime.fanout.publish(self.conversation_id, frame,
                                                          self.layer)
                    except Exception:  # noqa: BLE001 - a layer hiccup must not kill the run
                        logger.exception("group_send failed for %s", self.message_id)
            finally:
                self._outbox.task_done()

    def _append(self, content: str, kind: str = _CONTENT) -> None:
        """Add provider text (answer or reasoning): coalesced by time (a frame at most
        every CHAT_TUNING.delta_coalesce_ms) and by size (at once when
        CHAT_TUNING.delta_max_chars are pending, so a fast provider's text does not wait
        for the window)."""
        (self.text if kind == _CONTENT else self.reasoning).append(content)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((kind, content))
        self._pending_chars += len(content)
        window = settings.CHAT_TUNING.delta_coalesce_ms
        if window <= 0 or self._pending_chars >= settings.CHAT_TUNING.delta_max_chars:
            # With no window the delta is queued now: text appended until the publisher
            # takes it (the rest of this read's events) joins it (_delta_queued): a read
            # still makes one frame, without a timer per read or the loop pass it cost.
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(window / 1000, self._flush)

    def _flush(self) -> None:
        """Queue a delta of the pending text (at most one queued at a time).

        The delta's content and seq are taken when the publisher reaches it, not now: if
        the channel layer is slower than the stream, text piling up meanwhile goes out
        as one larger delta instead of a growing queue of small ones (docs/scale.md)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending or self._delta_queued:
            return
        self._delta_queued = True
        self.publish(_DELTA)

    def _take_frames(self) -> list[dict]:
        """The frames of all pending text, numbered now: one per run of the same kind
        (reasoning, then answer text, as the provider sent them), several with a seq
        each for a run longer than frames.DELTA_MAX_CHARS (one upstream read may bring
        more than a WebSocket message may carry); [] when none is left."""
        self._delta_queued = False
        if self._pending:
            metrics.DELTA_LAG.observe(time.monotonic() - self._pending_since)
        out: list[dict] = []
        runs: list[tuple[str, list[str]]] = []
        for kind, text in self._pending:
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(text)
            else:
                runs.append((kind, [text]))
        self._pending.clear()
        self._pending_chars = 0
        for kind, texts in runs:
            for content in frames.text_pieces("".join(texts)):
                self.seq += 1
                if kind == _CONTENT:
                    self.published_text.append(content)
                    out.append(frames.delta(self.message_id, self.seq, content))
                else:
                    self.published_reasoning.append(content)
                    out.append(frames.reasoning(self.message_id, self.seq, content))
        return out

    # -- the control channel --------------------------------------------------------
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
                    if message.get("message_id") in (None, self.message_id) and \
                            message.get("tab") in (None, self.tab):
                        self.cancel(message.get("reason") or "stop", message.get("at"))
                elif kind == "generation.sync" and message.get("reply_channel"):
                    await self.layer.send(
                        message["reply_channel"], frames.snapshot_reply(self.snapshot())
                    )
        finally:
            # Cancelled while answering a sync, the layer would keep it subscribed.
            await release_channel(self.layer, channel)

    # -- the task -----------------------------------------------------------------
    async def _run(self) -> None:
        usage, finish_reason, ttft_ms, ended_by = None, "", None, None
        first_text = not self.text  # taken over with text: its first token was elsewhere
        running_usage, provider, meta, stops = None, None, self._meta, self.run.autostop
        try:
            provider = await self.runtime.provider()
            request = StreamRequest(self.run.model, self.run.prompt, self.run.max_tokens,
                                    self.message_id)
            events = provider.stream(request, meta) if self.resume_at is None else \
                provider.resume(request, meta, *self.resume_at)
            # aclosing: the HTTP response is closed on every exit, including a
            # CancelledError raised at any await of this task.
            async with contextlib.aclosing(events):
                async for event in events:
                    if event.usage is not None:
                        usage = event.usage
                    if event.running_usage is not None:
                        running_usage = event.running_usage
                    if event.reasoning:
                        self._append(event.reasoning, _REASONING)
                        # Reasoning is billed as completion: the cost ceiling counts it.
                        if stops.check("", reasoning=event.reasoning) and self.cancel(stops.reason):
                            await asyncio.sleep(0)
                    if event.content:
                        if first_text:
                            first_text = False
                            ttft_ms = int((time.monotonic() - self.started_at) * 1000)
                        self._append(event.content)
                        # autostop hook: a rule that fires stops the run as a stop frame
                        # does; the cancellation lands at this await, before any read.
                        if stops.check(event.content) and self.cancel(stops.reason):
                            await asyncio.sleep(0)
                    if event.finish_reason:
                        finish_reason = event.finish_reason
                    if meta.sequence >= 0 and not meta.held:
                        self.resume_mark = (meta.sequence, len(self.text),
                                            len(self.reasoning))
                    if self._outbox.qsize() >= settings.CHAT_TUNING.outbox_limit:
                        # Back-pressure: a slow channel layer slows our reading (and so
                        # the provider, through TCP) instead of growing memory.
                        await self._outbox.join()
        except (asyncio.CancelledError, Exception) as exc:  # every end maps to an Outcome
            ended_by = exc
        # A stop before the response was open (no hang-up): its close is the aclosing's.
        metrics.stop_reached_upstream(self._stop_at)
        outcome = outcome_of(ended_by, finish_reason=finish_reason, failure=self._failure,
                             message_id=self.message_id,
                             cancel_reason=self.cancel_reason).with_timing(
            usage=usage or await counting.cancelled_usage(provider, meta, self, ended_by),
            ttft_ms=ttft_ms, duration_ms=int((time.monotonic() - self.started_at) * 1000))
        # The upstream stream is closed by now (aclosing): counting cannot delay a stop.
        # The text is final: what is pending goes out, and a stop now changes nothing.
        self._finishing = True
        self._flush()
        tokenized = None
        if outcome.usage is None and running_usage is None and provider is not None:
            tokenized = await counting.tokenized_run(provider, meta, self)
        outcome = outcome.with_counts(running_usage=running_usage, tokenized=tokenized,
                                      reasoning_hidden=meta.hidden_reasoning)
        await self._finish(outcome)
        if provider is not None and provider.wants_usage_after(meta):
            self.runtime.spawn(counting.lookup_usage(provider, meta, self.message_id),
                               name=f"lookup-{self.message_id}")
        if isinstance(ended_by, asyncio.CancelledError) and self._failure is None:
            raise asyncio.CancelledError

    async def _finish(self, outcome: Outcome) -> None:
        self._finishing = True
        try:
            for helper in self._helpers:
                helper.cancel()
            await asyncio.gather(*self._helpers, return_exceptions=True)
            self._flush()
            if self.cancel_reason == counting.HANDOVER:  # another worker goes on with it?
                outcome = await handover.leave(self, outcome)
                if outcome.status == Message.Status.STREAMING:
                    return  # still streaming, there: no usage record, no end here
            self.status = outcome.status
            record, outcome = await self._save(outcome, "".join(self.text),
                                               "".join(self.reasoning))
            finish_reason, error, usage = outcome.finish_reason, outcome.error, None
            if record is not None:
                usage = record.to_dict()
                if record.status != outcome.status:
                    # Finished elsewhere (a lease sweep): report the recorded end.
                    outcome = Outcome(record.status, "error", "The generation lost its lease.")
                    finish_reason, error = outcome.finish_reason, outcome.error
            self.status = outcome.status
            self.end_frame = frames.generation_end(self.message_id, outcome.status,
                                                   finish_reason, usage, error)
            self.publish(self.end_frame)
            self.publish(None)
            await self._publisher_task
        finally:
            self.runtime.discard(self)
            if self._control_channel:
                try:
                    await self.layer.group_discard(frames.control_group_name(self.conversation_id),
                                                   self._control_channel)
                except Exception:  # noqa: BLE001
                    logger.exception("group_discard failed")
            self._done.set()
            logger.info("generation %s %s after %d ms (%s)", self.message_id, self.status,
                        int((time.monotonic() - self.started_at) * 1000),
                        describe_end(outcome.finish_reason, self.cancel_reason))

    async def _save(self, outcome: Outcome, content: str, reasoning: str):
        """``store.finalize`` in a thread: ``(record or None, the outcome saved)``.

        Never tells the tabs an answer ended well when it is not saved: a failed save
        is retried as failed, with its text, or else with the last checkpointed text
        (the text may be what the database refused). A row left streaming would answer
        ``busy`` until its lease expired."""
        save = database_sync_to_async(store.finalize, thread_sensitive=False)
        try:
            return await save(self.run.ref, outcome, content, reasoning), outcome
        except Exception as exc:  # noqa: BLE001
            logger.exception("could not save the end of generation %s", self.message_id)
            failed = outcome.failed(f"The answer could not be saved ({type(exc).__name__}).")
        for kept, thought, note in ((content, reasoning, ""),
                                    (None, None, " Only its last saved part is kept.")):
            attempt = failed.failed(failed.error + note)
            try:
                return await save(self.run.ref, attempt, kept, thought), attempt
            except Exception:  # noqa: BLE001
                logger.exception("could not save generation %s as failed", self.message_id)
        return None, failed

    async def launch(self) -> None:
        """Start the publisher, the control listener and the run task. Raises what
        the channel layer raises (then nothing is left running)."""
        # Fresh contexts: these tasks outlive the caller, whose context may hold asgiref's
        # per-request executor (an async view under a sync middleware), which quits with it.
        self._publisher_task = asyncio.create_task(self._publisher(), context=Context())
        try:
            # The default prefix on purpose: channels-redis polls one Redis list per
            # prefix and process, so a second prefix would starve the consumers' channels.
            self._control_channel = await self.layer.new_channel()
            await self.layer.group_add(frames.control_group_name(self.conversation_id),
                                       self._control_channel)
        except BaseException:
            self._publisher_task.cancel()
            await release_channel(self.layer, self._control_channel)
            raise
        self._helpers = [asyncio.create_task(self._control(), context=Context())]
        self.task = asyncio.create_task(self._run(), name=f"generation-{self.message_id}",
                                        context=Context())
        self.task.add_done_callback(_log_task_end)
        metrics.ACTIVE_GENERATIONS.inc()
        self.task.add_done_callback(metrics.generation_task_done)
        if self.cancel_reason:
            self._cancel_task()  # cancelled while launching


def _log_task_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("generation task crashed", exc_info=task.exception())
