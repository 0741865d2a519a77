"""The server this project runs: daphne with flow control for each WebSocket.

daphne hands each connection's client messages to the application through an
unbounded ``asyncio.Queue`` and buffers what the application sends without limit, so a
client that writes faster than it is served, or never reads, grows the worker's
memory without bound. :class:`ChatServer` bounds both, through the extension points
daphne and Twisted offer:

- **Inbound**: the connection's queue is an :class:`InboundQueue`. Past
  ``INBOUND_HIGH`` messages the socket is no longer read (``pauseProducing`` of the
  transport, Twisted's ``IPushProducer``) until the consumer has taken it down to
  ``INBOUND_LOW``: the kernel's buffers fill and TCP slows the client.
- **Outbound**: a :class:`FlowControl` is registered as the transport's producer
  (Twisted's ``IConsumer.registerProducer``): Twisted pauses it when its write buffer
  is full (the client does not read) and resumes it once the buffer drained. Bytes
  sent while paused are counted; past ``UNSENT_LIMIT_BYTES`` the connection is
  aborted, which frees them.
- The consumer reaches the connection's :class:`FlowControl` through the ASGI scope
  extension ``"chat.flow"`` (extensions are the ASGI way for a server to offer more
  than the spec: asgi.readthedocs.io, "Extensions"), to stop reading a socket that
  floods (chat.ratelimit) and to skip work for a socket that does not read.

**Graceful shutdown** (:meth:`ChatServer.drain`): on SIGTERM or SIGINT the worker stops
listening, closes every WebSocket with 1012 (service restart: the tabs reconnect to
another worker at once and follow their answers there through the channel layer),
refuses new generations (``overloaded``, reason ``shutting_down``), lets the running
ones stream to their end for up to ``CHAT_SHUTDOWN_GRACE_S``, interrupts what is left
(chat.generation.drain), and only then lets daphne cancel what remains and the reactor
stop. A second signal ends the wait at once. The signals are taken on the asyncio loop
daphne's reactor runs on (``loop.add_signal_handler``) instead of Twisted's handlers,
whose SIGINT/SIGTERM stop the reactor at once; the drain itself is daphne's "before
shutdown" trigger :meth:`ChatServer.kill_all_applications`, so whatever stops the
reactor drains first (Twisted: a trigger that returns a Deferred delays the shutdown
until it fires).

**Reconnect storms**: when a worker stops, its tabs all reconnect to the others within
a second. Each worker listens with a backlog of ``LISTEN_BACKLOG`` (Twisted's default,
50, made Linux drop the SYNs of a burst: the clients retried 1, 3, 7 s later) and works
on at most ``MAX_OPENING`` WebSocket handshakes at once: past it the listening ports
stop being read (:meth:`ChatServer._pace_accepting`), so the rest wait in the kernel's
queue instead of timing out in daphne's (its handshake timeout runs from the request).

It is daphne's ``Server`` through daphne's own switches: the command-line interface's
``server_class`` (``python -m chatproject.server``, daphne's arguments) and the
``runserver`` command's ``server_cls`` (chat/management/commands/runserver.py).
daphne is pinned exactly (requirements.txt); tests/test_flow_control.py fails, naming
daphne's version, if the methods overridden here change shape.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from functools import partial

from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

logger = logging.getLogger(__name__)

# The daphne release the overrides below were written against (requirements.txt pins it;
# tests/test_flow_control.py checks both and the shapes of what is overridden).
CHECKED_DAPHNE = "4.2.3"
SCOPE_EXTENSION = "chat.flow"
INBOUND_HIGH = 64
INBOUND_LOW = 16
UNSENT_LIMIT_BYTES = 4 * 1024 * 1024
# Policy violation, service restart, try again later (RFC 6455 section 7.4.1; IANA).
PROTOCOL_CLOSE_CODES = frozenset({1008, 1012, 1013})
SERVICE_RESTART = 1012
# How long a drain waits for the sockets it closed to finish their close handshake (s).
CLOSE_WAIT_S = 2.0
# Connections the kernel holds for a worker until it accepts them. Twisted's default (50)
# overflows when the tabs of a stopped worker all reconnect within a second: Linux then
# drops their SYNs and the clients retry after 1, 3, 7, 15 s. Linux caps it at
# net.core.somaxconn (4096 since Linux 5.4).
LISTEN_BACKLOG = 4096
# WebSocket handshakes a worker works on at once (request read, not yet accepted or
# refused by the application). Past it the worker stops accepting connections until
# some are answered: the others wait in the kernel's backlog, where daphne's handshake
# timeout (--websocket_connect_timeout, from the request) has not started for them.
MAX_OPENING = 128


def with_backlog(endpoint: str, backlog: int = LISTEN_BACKLOG) -> str:
    """A Twisted server endpoint description (``tcp:port=8000:interface=127.0.0.1``,
    ``unix:/run/chat.sock``, ``ssl:...``: what daphne's ``-b``/``-p``/``-u`` build, or ``-e``) with
    ``backlog`` connections waiting to be accepted, when it names none; other endpoint
    types unchanged. Twisted's option (``backlog``, its default 50: Twisted's
    "endpoints" docs, serverFromString); Linux caps it at ``net.core.somaxconn``."""
    kind = str(endpoint).split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl", "unix") or ":backlog=" in str(endpoint):
        return endpoint
    return f"{endpoint}:backlog={backlog}"


@implementer(IPushProducer)
class FlowControl:
    """Flow control of one WebSocket connection.

    Read side: :meth:`pause_reading` / :meth:`resume_reading` by reason (the socket is
    read again when no reason remains), :meth:`pause_reading_for` a time (s).
    Write side: ``write_blocked`` is True while the client does not take what was sent
    (Twisted's buffer is full); ``unsent_bytes`` counts bytes (UTF-8) sent since.
    """

    def __init__(self, protocol):
        self._protocol = protocol
        self._pauses: set[str] = set()
        self._resume_timer: asyncio.TimerHandle | None = None
        self.write_blocked = False
        self.unsent_bytes = 0
        self.aborted = False

    # -- read side ----------------------------------------------------------------
    def pause_reading(self, reason: str) -> None:
        if not self._pauses and not self.aborted:
            self._protocol.transport.pauseProducing()
        self._pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self.aborted:
                self._protocol.transport.resumeProducing()

    def pause_reading_for(self, seconds: float) -> None:
        """Stop reading the socket for ``seconds`` (a later call may extend it)."""
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self.pause_reading("rate")
        self._resume_timer = asyncio.get_running_loop().call_later(
            seconds, self.resume_reading, "rate")

    @property
    def reading_paused(self) -> bool:
        return bool(self._pauses)

    # -- write side: Twisted's IPushProducer, called by the transport ----------------
    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's interface
        self.write_blocked = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.write_blocked = False
        self.unsent_bytes = 0

    def stopProducing(self) -> None:  # noqa: N802
        self.write_blocked = False
        if self._resume_timer is not None:
            self._resume_timer.cancel()

    def sending(self, nbytes: int) -> bool:
        """Account ``nbytes`` about to be sent; False (and the connection aborted) when
        a client that does not read would have more than ``UNSENT_LIMIT_BYTES``
        waiting."""
        if self.aborted:
            return False
        if not self.write_blocked:
            return True
        self.unsent_bytes += nbytes
        if self.unsent_bytes <= UNSENT_LIMIT_BYTES:
            return True
        self.aborted = True
        logger.warning("closing %r: its client has not read %d bytes",
                       self._protocol, self.unsent_bytes)
        # An abort drops Twisted's buffer at once; a close frame would wait behind it.
        self._protocol.transport.abortConnection()
        return False


class InboundQueue(asyncio.Queue):
    """daphne's per-connection queue of ASGI messages, bounded by not reading the socket
    past ``INBOUND_HIGH`` messages. ``listener``: an ``asyncio.Event`` set on every put
    (chat.dispatching waits on it)."""

    def __init__(self, flow: FlowControl):
        super().__init__()
        self.flow = flow
        self.listener: asyncio.Event | None = None

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        if self.qsize() >= INBOUND_HIGH:
            self.flow.pause_reading("queue")
        if self.listener is not None:
            self.listener.set()

    def get_nowait(self):
        item = super().get_nowait()
        if self.qsize() <= INBOUND_LOW:
            self.flow.resume_reading("queue")
        return item


class ChatServer(Server):
    """daphne's ``Server`` whose WebSocket connections have flow control, and that drains
    before it stops (module docstring). HTTP connections are daphne's own.

    ``shutdown_grace_s``: how long a drain lets running generations go on (s); None:
    ``settings.CHAT_SHUTDOWN_GRACE_S``. ``drain_report``: what the last drain did, for
    the log and the tests (``{"ended", "interrupted", "closed_sockets", "seconds"}``).
    """

    def __init__(self, *args, shutdown_grace_s: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.endpoints = [with_backlog(endpoint) for endpoint in self.endpoints]
        self.shutdown_grace_s = shutdown_grace_s
        self.ports: list = []
        self.drain_report: dict | None = None
        self._drain: asyncio.Future | None = None
        self._now = asyncio.Event()
        self._take_signals = False
        self._stopping = False
        # WebSocket protocols whose handshake the application has not answered yet.
        self._opening: set = set()
        self._accepting = True

    # -- graceful shutdown -----------------------------------------------------------
    def run(self):
        """daphne's ``run``, with SIGTERM and SIGINT taken by :meth:`signalled` instead
        of Twisted's handlers (when daphne would install signal handlers at all); once
        the reactor stopped, the objects left are frozen out of the garbage collector
        so that the process exits at once."""
        self._take_signals = self.signal_handlers
        self.signal_handlers = False
        reactor.callWhenRunning(self._install_signal_handlers)
        super().run()
        # The reactor has stopped: the process exits next. The interpreter's
        # finalization garbage-collects every object the imports made, over and over as
        # it clears the modules (seconds of CPU for Django and its libraries), which
        # would keep a drained worker alive past its grace. Frozen objects are left out
        # of every later collection (gc.freeze, Python's gc docs); atexit handlers still
        # run, and the kernel frees the memory at once.
        gc.freeze()

    def _install_signal_handlers(self):
        # Python delivers signals to the main thread only (runserver's autoreloader runs
        # the server in another thread and passes signal_handlers=False anyway).
        if not self._take_signals or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_event_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.signalled, signum)

    def signalled(self, signum: int) -> None:
        """SIGTERM/SIGINT: the first one drains and then stops the reactor; the next
        one cuts the drain's wait short (what still runs is interrupted now)."""
        if not self._stopping and reactor.running:
            self._stopping = True
            logger.warning("%s: draining (grace %s s); send it again to stop now",
                           signal.Signals(signum).name, self._grace_s())
            reactor.stop()
        else:
            logger.warning("%s again: interrupting what still runs", signal.Signals(signum).name)
            self._now.set()

    def listen_success(self, port):
        """daphne's, keeping the listening port so that a drain can close it."""
        self.ports.append(port)
        super().listen_success(port)

    # -- pacing the handshakes of a reconnect storm ---------------------------------------
    def protocol_connected(self, protocol):
        """daphne's (a request was read: an HTTP request, or a WebSocket handshake), and
        a WebSocket handshake counted as opening until the application answers it."""
        super().protocol_connected(protocol)
        if isinstance(protocol, WebSocketProtocol):
            self._opening.add(protocol)
            self._pace_accepting()

    def protocol_disconnected(self, protocol):
        """daphne's, and the handshake (if any) no longer counted as opening."""
        super().protocol_disconnected(protocol)
        self._answered(protocol)

    def _answered(self, protocol) -> None:
        if protocol in self._opening:
            self._opening.discard(protocol)
            self._pace_accepting()

    def _pace_accepting(self) -> None:
        """Stop accepting connections (Twisted's ``stopReading`` of the listening ports,
        ``IReadDescriptor``) while ``MAX_OPENING`` handshakes are opening; accept again
        below it. A worker that drains has stopped listening for good."""
        accepting = len(self._opening) < MAX_OPENING
        if accepting == self._accepting or self._stopping:
            return
        self._accepting = accepting
        for port in self.ports:
            if accepting:
                port.startReading()
            else:
                port.stopReading()

    def kill_all_applications(self):
        """daphne's "before shutdown" trigger, after :meth:`drain`: the Deferred fires
        once the drain is done and daphne has cancelled the application instances left
        (HTTP requests; the WebSockets are closed by then)."""
        self._drain = asyncio.ensure_future(self.drain())
        drained = defer.Deferred.fromFuture(self._drain)
        drained.addErrback(lambda failure: logger.error("drain failed: %s", failure.value))
        drained.addCallback(lambda _: super(ChatServer, self).kill_all_applications())
        return drained

    def _grace_s(self) -> float:
        if self.shutdown_grace_s is not None:
            return self.shutdown_grace_s
        from django.conf import settings  # configured by the application's import

        return float(settings.CHAT_SHUTDOWN_GRACE_S)

    async def drain(self) -> dict:
        """Stop listening, refuse new generations, close every WebSocket with 1012, wait
        for the running generations (chat.generation.drain.finish_runs: up to the
        grace, or a second signal), then for the closed sockets to go (up to
        ``CLOSE_WAIT_S``). Returns and logs :attr:`drain_report`."""
        # chat.generation needs Django's apps, loaded when the application was imported
        # (after this module, which daphne's command line imports first).
        from chat.generation import drain

        began = time.monotonic()
        drain.begin()
        self._stopping = True  # also when the reactor was stopped by other means
        for port in self.ports:
            port.stopListening()
        closed = self.close_websockets(SERVICE_RESTART)
        result = await drain.finish_runs(self._grace_s(), self._now)
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self._open_websockets() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.drain_report = {**result, "closed_sockets": closed,
                             "seconds": round(time.monotonic() - began, 2)}
        logger.warning("drained: %s", self.drain_report)
        return self.drain_report

    def _open_websockets(self) -> list:
        return [protocol for protocol, details in list(self.connections.items())
                if "flow" in details and not details.get("disconnected")]

    def close_websockets(self, code: int) -> int:
        """Send a close frame with ``code`` (RFC 6455 section 7.4.1) to every open
        WebSocket; returns how many. daphne then hands each application its
        ``websocket.disconnect`` as for any close."""
        closed = 0
        for protocol in self._open_websockets():
            if protocol.state == protocol.STATE_OPEN:
                protocol.sendCloseFrame(code=code, isReply=False)
                closed += 1
        return closed

    def create_application(self, protocol, scope):
        """daphne 4.2's ``Server.create_application`` for a WebSocket, with an
        :class:`InboundQueue` and a :class:`FlowControl` registered as the transport's
        producer and offered in ``scope["extensions"]``."""
        if scope.get("type") != "websocket":
            return super().create_application(protocol, scope)
        assert "application_instance" not in self.connections[protocol]
        flow = FlowControl(protocol)
        transport = protocol.transport
        # The HTTP channel that carried the upgrade registered itself as the
        # transport's producer; the socket is a WebSocket's now.
        if transport.producer is not None:
            transport.unregisterProducer()
        transport.registerProducer(flow, True)
        queue = InboundQueue(flow)
        scope.setdefault("asgi", {"version": "3.0"})
        scope["extensions"] = {**(scope.get("extensions") or {}), SCOPE_EXTENSION: flow}
        instance = self.application(scope=scope, receive=queue.get,
                                    send=partial(self.handle_reply, protocol))
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(instance)
        self.connections[protocol]["flow"] = flow
        return queue

    async def handle_reply(self, protocol, message):
        """daphne's, after accounting what a WebSocket sends (:meth:`FlowControl.sending`):
        nothing more is sent to a connection aborted for not reading. A close with a
        code of RFC 6455 section 7.4.1 that autobahn's ``sendClose`` refuses to an
        application (it allows 1000 and 3000-4999), such as 1008 (policy violation)
        and 1012 (service restart, IANA's registry), goes out through autobahn's
        ``sendCloseFrame``, as daphne sends its own 1011."""
        kind = message.get("type")
        if kind in ("websocket.accept", "websocket.close"):
            self._answered(protocol)
        if kind == "websocket.close" and message.get("code") in PROTOCOL_CLOSE_CODES:
            details = self.connections.get(protocol)
            if details and not details.get("disconnected") and \
                    protocol.state == protocol.STATE_OPEN:
                protocol.sendCloseFrame(code=message["code"], isReply=False)
            return
        if kind == "websocket.send":
            details = self.connections.get(protocol)
            flow = details.get("flow") if details else None
            if flow is not None:
                payload = message.get("bytes") or message.get("text") or ""
                # len() of the text, not its UTF-8 size: at most 4x less, and free.
                if not flow.sending(len(payload)):
                    return
        await super().handle_reply(protocol, message)


class ChatCommandLineInterface(CommandLineInterface):
    """daphne's command line, serving with :class:`ChatServer`."""

    server_class = ChatServer


if __name__ == "__main__":
    # Run as ``python -m chatproject.server`` this file is ``__main__``; the classes the
    # application imports (chat.dispatching checks for InboundQueue) are those of
    # ``chatproject.server``, so the server must be built from that module too.
    from chatproject import server

    server.ChatCommandLineInterface.entrypoint()
