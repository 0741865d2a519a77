"""The per-event-loop state of this process: ONE :class:`Runtime` per event loop.

It holds what used to be six module-level registries: the generations running here
(by conversation), the providers (their connection pools are bound to the
loop), the demo model server, the loop's background tasks (lease checkpointer and
sweeper) and the tasks that own detached runs (the SSE view's); and the loop's
:class:`~chat.generation.fanout.Fanout` (the sockets watching each conversation). Tests
run one loop per test and daphne one per process, so a Runtime lives and dies with its
loop (weakly keyed: nothing outlives a closed loop).

Only this module (and the Fanout it owns) keeps mutable per-loop state; everything else
asks ``Runtime.current()`` through the public methods below.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import uuid
import weakref
from collections.abc import Callable, Coroutine
from contextvars import Context
from typing import TYPE_CHECKING

from django.conf import settings

from ..demo_model import UpstreamServer
from . import providers
from .fanout import Fanout
from .startqueue import StartQueue

if TYPE_CHECKING:
    from .task import Generation

# Runtime.start_service_ms is the time of the last batches over their starts, as many
# batches as cover this many starts: a drain rate over a few batches, so that a small
# batch slowed by what the loop did meanwhile (launching the previous batch's runs)
# does not stand for a whole crowd.
START_WINDOW = 128
# Batches of fewer starts do not update it: a lone start's time is the fixed cost of a
# trip to a thread and a commit (and, the first time, of opening the connection), not
# what each start of a crowd adds.
START_SAMPLE_MIN = 8

_runtimes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class Runtime:
    """What this process runs on one event loop. Get it with :meth:`current`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._generations: dict[uuid.UUID, Generation] = {}
        self._providers: dict[tuple, providers.Provider] = {}
        self._demo_server: UpstreamServer | None = None
        self._services: dict[str, asyncio.Task] = {}
        self._detached: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        # The sockets of this loop by conversation, and the relay to other processes.
        self.fanout = Fanout()
        # The worker was told to stop: nothing new starts (chat.generation.drain).
        self.draining = False
        # Admission control (chat.generation.admission): the smoothed lateness of the
        # loop's probe timer (ms), its largest single lateness, and whether new
        # generations are refused for lag (kept for the hysteresis).
        self.loop_lag_ms = 0.0
        self.loop_lag_peak_ms = 0.0
        self.lag_refusing = False
        # Starts admitted whose transaction has not finished (service.start_generation),
        # by a token, with the loop time (s) each was admitted at: insertion order is
        # admission order, so the first is the one waiting longest. The queue their
        # transactions wait in (committed a batch at a time), the last batches
        # (starts, ms) and the time one start adds to the wait of those behind it (ms:
        # their time over their starts; see starts_served).
        self._starts: dict[object, float] = {}
        self.start_queue = StartQueue(loop, self.starts_served)
        self._start_batches: collections.deque[tuple[int, float]] = collections.deque()
        self.start_service_ms = 0.0

    @classmethod
    def current(cls) -> Runtime:
        """The Runtime of the running event loop (made on first use). Raises
        RuntimeError outside a running loop."""
        loop = asyncio.get_running_loop()
        runtime = _runtimes.get(loop)
        if runtime is None:
            with _lock:
                runtime = _runtimes.setdefault(loop, cls(loop))
        return runtime

    # -- running generations ----------------------------------------------------------
    def get(self, conversation_id) -> Generation | None:
        """The conversation's generation running on this loop, if any (ending ones
        included, until their end is published)."""
        return self._generations.get(uuid.UUID(str(conversation_id)))

    def add(self, generation: Generation) -> None:
        """Register a run being started (prepared, not yet launched)."""
        self._generations[uuid.UUID(generation.conversation_id)] = generation

    def discard(self, generation: Generation) -> None:
        """Forget a run that ended or never launched (idempotent)."""
        key = uuid.UUID(generation.conversation_id)
        if self._generations.get(key) is generation:
            del self._generations[key]

    def running(self) -> list[Generation]:
        """Runs whose task streams on this loop now: launched, not done, not ending
        (the ones whose text is checkpointed)."""
        return [g for g in list(self._generations.values()) if g.is_streaming()]

    def generations(self) -> list[Generation]:
        """Every generation registered on this loop (starting, streaming or ending)."""
        return list(self._generations.values())

    def count(self) -> int:
        """Generations registered on this loop (starting, streaming or ending)."""
        return len(self._generations)

    def streams(self) -> int:
        """Generations registered on this loop whose ``generation.end`` is not out yet
        (starting or streaming): what ``CHAT_MAX_STREAMS_PER_WORKER`` caps. A run that
        told its tabs it ended no longer counts, though its task is still tidying up:
        a tab may send its next message as soon as it reads the end."""
        return sum(1 for g in self._generations.values() if g.end_frame is None)

    # -- starts waiting for their transaction (admission's "starts") ---------------
    def start_began(self) -> object:
        """Count a start admitted now until :meth:`start_ended` with the token returned."""
        token = object()
        self._starts[token] = self.loop.time()
        return token

    def start_ended(self, token: object) -> None:
        """The start's transaction finished (or failed); idempotent."""
        self._starts.pop(token, None)

    def starts_served(self, count: int, elapsed_s: float) -> None:
        """A batch of ``count`` starts took ``elapsed_s`` (s, its trip to a thread and
        its transaction). :attr:`start_service_ms`, what each start adds to the wait
        of those behind it, becomes the time of the last batches over their starts
        (batches of ``START_SAMPLE_MIN`` starts or more, covering ``START_WINDOW``
        starts)."""
        if count < START_SAMPLE_MIN:
            return
        batches = self._start_batches
        batches.append((count, elapsed_s * 1000.0))
        while sum(n for n, _ in batches) - batches[0][0] >= START_WINDOW:
            batches.popleft()
        self.start_service_ms = sum(ms for _, ms in batches) / sum(n for n, _ in batches)

    @property
    def starting(self) -> int:
        """Starts admitted whose transaction has not finished."""
        return len(self._starts)

    def oldest_start_wait_ms(self) -> float:
        """How long the oldest unfinished start has waited since its admission (ms; 0
        when none waits)."""
        for began in self._starts.values():
            return (self.loop.time() - began) * 1000.0
        return 0.0

    def expected_start_wait_ms(self) -> float:
        """The wait a start admitted now should expect (ms): the longer of the oldest
        one's wait so far and the starts waiting (itself included) times
        :attr:`start_service_ms`. The second sees a crowd admitted in one instant
        (clients coming back after a refusal) before any of them has waited long."""
        return max(self.oldest_start_wait_ms(),
                   (len(self._starts) + 1) * self.start_service_ms)

    # -- the provider --------------------------------------------------------------
    async def provider(self) -> providers.Provider:
        """The provider of this loop for the current settings (``OPENAI_API``), pointed
        at the configured server or at this loop's demo model server; one instance per
        configuration, as its connection pool is bound to this loop."""
        cls, base_url, api_key = providers.configured()
        if providers.uses_demo_model():
            server = await self.demo_server(settings.DEMO_TOKENS_PER_SECOND)
            base_url, api_key = server.base_url, "demo"
        key = cls.key(base_url, api_key)
        provider = self._providers.get(key)
        if provider is None:
            provider = self._providers[key] = cls(base_url, api_key)
        return provider

    async def demo_server(self, tokens_per_second: float) -> UpstreamServer:
        """This loop's demo model server, started on first use."""
        server = self._demo_server
        if server is None:
            server = UpstreamServer(tokens_per_second=tokens_per_second)
            await server.start()
            self._demo_server = server
        # Keep the record list small in a long-running process.
        if len(server.requests) > 1000:
            server.requests = [r for r in server.requests if r.open]
        return server

    # -- background tasks ------------------------------------------------------------
    def ensure_service(
        self, name: str, factory: Callable[[], Coroutine]
    ) -> asyncio.Task:
        """The loop's task ``name``, started from ``factory()`` unless it runs already
        (the lease checkpointer and sweeper: chat.generation.leases)."""
        task = self._services.get(name)
        if task is None or task.done():
            # A fresh context: this task lives as long as the loop, not as its first caller.
            task = self.loop.create_task(
                factory(), name=f"{name}-{uuid.uuid4().hex[:6]}", context=Context()
            )
            self._services[name] = task
        return task

    def keep(self, task: asyncio.Task) -> None:
        """Hold a reference to a task that owns a detached run until it ends (asyncio
        keeps only weak references to tasks)."""
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    def spawn(self, coro: Coroutine, name: str) -> asyncio.Task:
        """Run ``coro`` as a background task of this loop that outlives its caller (a
        run's usage lookup: chat.generation.counting.lookup_usage); held until it ends,
        cancelled by :meth:`shutdown`."""
        task = self.loop.create_task(coro, name=name, context=Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def background_tasks(self) -> int:
        """How many tasks of :meth:`spawn` are still running."""
        return sum(not task.done() for task in self._background)

    async def shutdown(self) -> None:
        """Cancel the background tasks of :meth:`spawn` and wait for them (the process
        is ending: a lookup not done by then leaves the record as counted)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
