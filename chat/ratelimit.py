"""What one socket and one user may make this worker do: client frame rates and
sockets per user.

Every client frame costs tokens from two token buckets, its socket's and its user's
(shared by that user's sockets on this worker). A bucket holds up to ``BURST_S``
seconds of its rate and refills continuously (the token bucket of RFC 2697, single
rate, one bucket per limit). Costs: a frame that starts work on the server
(``message``, ``regenerate``, ``edit``, ``sync``) costs ``COSTLY`` tokens; any other
frame ``CHEAP``. A ``stop`` is never refused: over the limit it is still handled, and
only counts as an excess frame below.

With ``CHAT_FRAME_RATE`` = 10 tokens/s (the default), one socket may send a costly
frame every half second on average and six in a burst, and a user twice that over
all their sockets: far above what a person clicks, far below a script's flood.

A refused frame is dropped. The socket is told once, with a ``rate_limited`` error
frame carrying ``retry_after_ms``, at most once per ``NOTICE_INTERVAL_S``. A socket
that keeps sending while refused is no longer read for a while (``PAUSE_AFTER_DROPS``
drops within ``DROP_WINDOW_S``: TCP then slows the client instead of this worker
parsing what it would drop) and is closed with 1008 (policy violation, RFC 6455
section 7.4.1) after ``CLOSE_AFTER_DROPS`` drops within the window; its user may then
open no socket on this worker for ``COOL_DOWN_S``.

Limits are per worker process: behind a load balancer a user's share of the whole
deployment is these figures times the number of workers.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from django.conf import settings

COSTLY = 5
CHEAP = 1
COSTLY_TYPES = frozenset({"message", "regenerate", "edit", "sync"})
BURST_S = 3.0
USER_RATE_FACTOR = 2
NOTICE_INTERVAL_S = 1.0
DROP_WINDOW_S = 10.0
PAUSE_AFTER_DROPS = 10
CLOSE_AFTER_DROPS = 50
PAUSE_MAX_S = 1.0
COOL_DOWN_S = 10.0


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` tokens held; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens are there (0.0: now). Takes nothing."""
        self._refill(now)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate

    def take(self, cost: float) -> None:
        self.tokens -= cost

    @property
    def full(self) -> bool:
        self._refill(time.monotonic())
        return self.tokens >= self.burst


@dataclasses.dataclass
class _User:
    bucket: TokenBucket
    sockets: int = 0
    cooling_until: float = 0.0


_users: dict[int, _User] = {}


def _rate() -> float:
    return float(settings.CHAT_FRAME_RATE)


class SocketRefused(Exception):
    """A user may not open another socket on this worker now: ``code`` is
    ``too_many_sockets`` (``CHAT_MAX_SOCKETS_PER_USER`` open) or ``rate_limited``
    (cooling down after a socket of theirs was closed for flooding)."""

    def __init__(self, code: str, detail: str, retry_after_ms: int | None = None):
        super().__init__(detail)
        self.code, self.detail, self.retry_after_ms = code, detail, retry_after_ms


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with a frame over the limit: ``handle`` it anyway (a ``stop``) or
    drop it; ``notify`` (send the ``rate_limited`` frame now, with ``retry_after_ms``);
    ``pause_s`` (stop reading the socket this long; 0: keep reading); ``close`` (close
    it with 1008)."""

    handle: bool
    retry_after_ms: int
    notify: bool
    pause_s: float
    close: bool


class SocketLimits:
    """The frame limits of one socket of ``user_id``. Create it with :func:`open_socket`
    and call :meth:`close` when the socket ends (both once)."""

    def __init__(self, user_id: int, user: _User):
        rate = _rate()
        self.user_id, self._user = user_id, user
        self._bucket = TokenBucket(rate, rate * BURST_S) if rate > 0 else None
        self._drops: collections.deque[float] = collections.deque()
        self._noticed_at = -NOTICE_INTERVAL_S
        self._closed = False

    def check(self, frame_type: str) -> Verdict | None:
        """Charge one client frame of ``frame_type``; None when it is within the limits,
        else the :class:`Verdict` on it."""
        if self._bucket is None:
            return None
        cost = COSTLY if frame_type in COSTLY_TYPES else CHEAP
        now = time.monotonic()
        wait = max(self._bucket.wait_s(cost, now), self._user.bucket.wait_s(cost, now))
        if wait == 0.0:
            self._bucket.take(cost)
            self._user.bucket.take(cost)
            return None
        drops = self._drops
        drops.append(now)
        while now - drops[0] > DROP_WINDOW_S:
            drops.popleft()
        handle = frame_type == "stop"
        notify = not handle and now - self._noticed_at >= NOTICE_INTERVAL_S
        if notify:
            self._noticed_at = now
        close = len(drops) >= CLOSE_AFTER_DROPS
        if close:
            self._user.cooling_until = now + COOL_DOWN_S
        pause = min(wait, PAUSE_MAX_S) if len(drops) >= PAUSE_AFTER_DROPS else 0.0
        return Verdict(handle=handle, retry_after_ms=max(1, round(wait * 1000)), notify=notify,
                       pause_s=pause, close=close)

    def close(self) -> None:
        """The socket ended: it no longer counts against its user's cap."""
        if self._closed:
            return
        self._closed = True
        user = self._user
        user.sockets -= 1
        if user.sockets <= 0 and time.monotonic() >= user.cooling_until and user.bucket.full:
            # Nothing to remember: a later socket starts from the same full bucket.
            _users.pop(self.user_id, None)


def open_socket(user_id: int) -> SocketLimits:
    """Count a new socket of ``user_id`` on this worker and return its limits.

    Raises :class:`SocketRefused` when the user already has ``CHAT_MAX_SOCKETS_PER_USER``
    sockets here (0: no cap) or is cooling down after a flood."""
    now = time.monotonic()
    user = _users.get(user_id)
    if user is None:
        if len(_users) >= _PRUNE_AT[0]:
            _forget_idle(now)
        # With the limit off (rate 0) the bucket is empty and never asked (SocketLimits).
        rate = _rate() * USER_RATE_FACTOR
        user = _users[user_id] = _User(TokenBucket(rate, rate * BURST_S))
    if now < user.cooling_until:
        wait_ms = round((user.cooling_until - now) * 1000)
        raise SocketRefused("rate_limited", "Too many frames from your sockets; "
                            f"try again in {max(1, round(wait_ms / 1000))} s.", wait_ms)
    cap = settings.CHAT_MAX_SOCKETS_PER_USER
    if cap and user.sockets >= cap:
        raise SocketRefused("too_many_sockets", f"You have {user.sockets} chat tabs open "
                            f"(the limit is {cap}); close one and reload.")
    user.sockets += 1
    return SocketLimits(user_id, user)


# Past this many users remembered, the idle ones are forgotten (then twice as many).
_PRUNE_AT = [1024]


def _forget_idle(now: float) -> None:
    """Forget the users with no socket here, not cooling down and with a full bucket
    (a user whose last socket closed before the bucket refilled is kept by close())."""
    for user_id, user in list(_users.items()):
        if user.sockets <= 0 and now >= user.cooling_until and user.bucket.full:
            del _users[user_id]
    _PRUNE_AT[0] = max(1024, 2 * len(_users))


def forget_users() -> None:
    """Forget every user's sockets, bucket and cool-down on this worker (for tests,
    whose users' ids repeat from one test to the next)."""
    _users.clear()
