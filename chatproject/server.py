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

It is daphne's ``Server`` through daphne's own switches: the command-line interface's
``server_class`` (``python -m chatproject.server``, daphne's arguments) and the
``runserver`` command's ``server_cls`` (chat/management/commands/runserver.py).
daphne is pinned exactly (requirements.txt); tests/test_flow_control.py fails, naming
daphne's version, if the methods overridden here change shape.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from daphne.cli import CommandLineInterface
from daphne.server import Server
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

logger = logging.getLogger(__name__)

SCOPE_EXTENSION = "chat.flow"
INBOUND_HIGH = 64
INBOUND_LOW = 16
UNSENT_LIMIT_BYTES = 4 * 1024 * 1024
# Policy violation, service restart, try again later (RFC 6455 section 7.4.1; IANA).
PROTOCOL_CLOSE_CODES = frozenset({1008, 1012, 1013})


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
    """daphne's ``Server`` whose WebSocket connections have flow control (module
    docstring). HTTP connections are daphne's own."""

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
    ChatCommandLineInterface.entrypoint()
