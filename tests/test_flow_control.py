"""chatproject.server: what ChatServer relies on in daphne, autobahn and Twisted still
has the shape it was written for, and its flow control pauses and aborts as it says.
The behaviour on a live worker: tests/test_flood.py."""

import asyncio
import inspect
import re
from importlib.metadata import version

import daphne
import pytest
from autobahn.websocket.protocol import WebSocketProtocol as AutobahnProtocol
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol

from chatproject import server
from tests.live import ROOT

DAPHNE = (f"daphne {version('daphne')} "
          f"(chatproject/server.py was written for {server.CHECKED_DAPHNE})")


def test_daphne_is_pinned_to_the_release_chat_server_was_written_for():
    pins = re.findall(r"^daphne==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert pins == [server.CHECKED_DAPHNE], f"requirements.txt pins {pins}; {DAPHNE}"
    assert version("daphne") == daphne.__version__ == server.CHECKED_DAPHNE, DAPHNE


@pytest.mark.parametrize("name, parameters", [
    ("create_application", ["self", "protocol", "scope"]),
    ("handle_reply", ["self", "protocol", "message"]),
    ("kill_all_applications", ["self"]),
    ("protocol_connected", ["self", "protocol"]),
    ("protocol_disconnected", ["self", "protocol"]),
    ("listen_success", ["self", "port"]),
    ("run", ["self"]),
])
def test_the_daphne_methods_chat_server_overrides_keep_their_shape(name, parameters):
    method = getattr(Server, name, None)
    assert method is not None, f"{DAPHNE}: Server.{name} is gone"
    assert list(inspect.signature(method).parameters) == parameters, \
        f"{DAPHNE}: Server.{name}{inspect.signature(method)} changed"


def test_daphne_still_feeds_a_connection_through_its_queues_put_nowait():
    # ChatServer.create_application copies daphne's: the queue's get is the ASGI
    # receive, the protocol puts every client message with put_nowait, the reply goes
    # through handle_reply, and the connections dict holds each instance.
    create = inspect.getsource(Server.create_application)
    for needle in ("receive=input_queue.get", "partial(self.handle_reply, protocol)",
                   'self.connections[protocol]["application_instance"]'):
        assert needle in create, f"{DAPHNE}: create_application no longer has {needle!r}"
    on_message = inspect.getsource(WebSocketProtocol.onMessage)
    assert "self.application_queue.put_nowait(" in on_message, \
        f"{DAPHNE}: WebSocketProtocol.onMessage no longer puts with put_nowait"


def test_autobahn_can_still_send_the_close_codes_its_send_close_refuses():
    signature = inspect.signature(AutobahnProtocol.sendCloseFrame)
    assert {"code", "isReply"} <= set(signature.parameters), \
        f"autobahn {version('autobahn')}: sendCloseFrame{signature}"


class _Transport:
    """What FlowControl asks of a Twisted transport, recorded."""

    def __init__(self):
        self.calls: list[str] = []

    def pauseProducing(self):  # noqa: N802 - Twisted's interface
        self.calls.append("pause")

    def resumeProducing(self):  # noqa: N802
        self.calls.append("resume")

    def abortConnection(self):  # noqa: N802
        self.calls.append("abort")


class _Protocol:
    def __init__(self):
        self.transport = _Transport()


async def test_a_socket_is_no_longer_read_past_the_high_mark_until_the_consumer_caught_up():
    protocol = _Protocol()
    queue = server.InboundQueue(server.FlowControl(protocol))
    for i in range(server.INBOUND_HIGH - 1):
        queue.put_nowait(i)
    assert protocol.transport.calls == []
    queue.put_nowait("one more")
    assert protocol.transport.calls == ["pause"]
    queue.put_nowait("already read")  # what the last read brought still queues
    while queue.qsize() > server.INBOUND_LOW + 1:
        await queue.get()
    assert protocol.transport.calls == ["pause"]
    await queue.get()
    assert protocol.transport.calls == ["pause", "resume"]


async def test_the_read_pauses_of_the_queue_and_the_rate_limit_add_up():
    protocol = _Protocol()
    flow = server.FlowControl(protocol)
    flow.pause_reading("queue")
    flow.pause_reading_for(0.05)
    flow.resume_reading("queue")
    assert protocol.transport.calls == ["pause"] and flow.reading_paused
    await asyncio.sleep(0.1)
    assert protocol.transport.calls == ["pause", "resume"] and not flow.reading_paused


def test_a_client_that_does_not_read_is_aborted_past_the_unsent_limit():
    protocol = _Protocol()
    flow = server.FlowControl(protocol)
    assert flow.sending(server.UNSENT_LIMIT_BYTES * 2)  # the client reads: no limit
    flow.pauseProducing()  # Twisted: its write buffer is full
    assert flow.sending(server.UNSENT_LIMIT_BYTES)
    assert not flow.sending(1)
    assert protocol.transport.calls == ["abort"]
    assert not flow.sending(1) and protocol.transport.calls == ["abort"]


def test_a_client_that_reads_again_starts_a_fresh_count():
    flow = server.FlowControl(_Protocol())
    flow.pauseProducing()
    assert flow.sending(server.UNSENT_LIMIT_BYTES)
    flow.resumeProducing()
    flow.pauseProducing()
    assert flow.sending(server.UNSENT_LIMIT_BYTES)


def test_listening_addresses_get_a_backlog_unless_they_name_one():
    assert server.with_backlog("tcp:port=8000:interface=127.0.0.1") == \
        f"tcp:port=8000:interface=127.0.0.1:backlog={server.LISTEN_BACKLOG}"
    assert server.with_backlog("tcp:port=8000:backlog=10") == "tcp:port=8000:backlog=10"
    assert server.with_backlog("fd:domain=INET:fileno=3") == "fd:domain=INET:fileno=3"
