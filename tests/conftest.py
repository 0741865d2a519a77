"""Shared fixtures: named users (alice owns, bob must be refused), a real loopback
upstream server speaking the OpenAI streaming format, and WebSocket clients that
authenticate with a real Django session cookie.

No test may reach the network: every socket connect to a non-loopback address fails.
"""

import asyncio
import ipaddress
import json
import socket
import uuid

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client

from chat.demo_model import UpstreamServer
from chat.generation import providers
from tests import realmodel
from tests.live import LiveServer

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", ""}

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path (PostgreSQL socket)
        return True
    host = address[0]
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _is_local(address):
        raise RuntimeError(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise RuntimeError(f"test tried to reach the network: {address!r}")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode()
    if host not in LOOPBACK_NAMES and host is not None:
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise RuntimeError(f"test tried to reach the network: {host!r}")
        except ValueError:
            raise RuntimeError(f"test tried to resolve a network name: {host!r}") from None
    return _real_getaddrinfo(host, *args, **kwargs)


def pytest_configure(config):
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo


def pytest_addoption(parser):
    parser.addoption(
        "--realmodel", action="store_true", default=False,
        help="run the tests marked realmodel against llama-server (also REALMODEL=1)",
    )


def pytest_collection_modifyitems(config, items):
    if realmodel.requested(config):
        return
    skip = pytest.mark.skip(reason=f"realmodel: {realmodel.REQUESTED_HELP}")
    for item in items:
        if item.get_closest_marker("realmodel") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not realmodel.FIGURES:
        return
    terminalreporter.section("realmodel figures (llama-server, SmolLM2-135M-Instruct)")
    for name, figures in realmodel.FIGURES:
        shown = ", ".join(f"{key}={value}" for key, value in figures.items())
        terminalreporter.write_line(f"{name}: {shown}")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """After the session, end the connections that worker threads (database_sync_to_async)
    left open, so PostgreSQL lets pytest-django drop the test database."""
    yield
    from django.db import connection

    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """A new channel layer instance per test: each test has its own event loop, and
    channels-redis binds its locks and connections to the loop that first used them."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


# --- users ----------------------------------------------------------------------------
@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password-1")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password-1")


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


# --- upstream ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_frame_limits():
    """Each test's users start with full frame buckets and no sockets counted."""
    from chat import ratelimit

    ratelimit.forget_users()
    yield


@pytest.fixture(autouse=True)
def fresh_provider_memory():
    """Detected provider profiles and refused parameters are remembered per base URL for
    the process (chat.generation.providers); a port may be reused by a later test's
    upstream speaking another dialect."""
    providers.forget()
    yield
    providers.forget()


@pytest.fixture
def upstream(settings):
    """A real OpenAI-compatible server on a loopback port, in its own thread and event
    loop, that the app reaches through the openai SDK (no mocks)."""
    server = UpstreamServer(tokens_per_second=50).start_in_thread()
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "test-key-not-secret"
    settings.OPENAI_MAX_RETRIES = 0
    # It speaks Chat Completions unless a test switches it (and OPENAI_API) to
    # "responses", whatever profile a test picks (the openai profile's default API is
    # responses).
    settings.OPENAI_API = "chat"
    settings.CHAT_MODEL = "test-model"
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(checkpoint_ms=200)
    yield server
    server.stop_thread()


# --- a real inference engine ---------------------------------------------
@pytest.fixture(scope="session")
def llama_server(request):
    """llama.cpp's llama-server serving SmolLM2-135M-Instruct on a loopback port, for
    the whole session (tests/realmodel.py). Skipped unless the realmodel tests were
    requested; fails if they were and the engine cannot be built or started."""
    if not realmodel.requested(request.config):
        pytest.skip(f"realmodel: {realmodel.REQUESTED_HELP}")
    binary, gguf = realmodel.build()
    server = realmodel.LlamaServer(binary, gguf).start()
    yield server
    server.stop()


@pytest.fixture
def engine(llama_server, settings):
    """The app pointed at the real engine (in this process's settings): its served
    model, answers capped at 200 tokens (under 10 s at the 25-30 tokens/s one thread
    decodes on a loaded 2-core machine), the engine's context size."""
    settings.OPENAI_BASE_URL = llama_server.base_url
    settings.OPENAI_API_KEY = "test-key-not-secret"
    settings.OPENAI_MAX_RETRIES = 0
    settings.CHAT_MODEL = llama_server.model
    settings.CHAT_MODELS = [llama_server.model]
    settings.CHAT_MAX_TOKENS = 200
    settings.CHAT_CONTEXT_TOKENS = llama_server.context
    return llama_server


# --- WebSocket clients ------------------------------------------------------------------
class ChatSocket:
    """A WebSocket client of the real ASGI application (auth, origin check, routing)."""

    def __init__(self, communicator: WebsocketCommunicator):
        self.comm = communicator
        self.frames: list[dict] = []

    async def send(self, frame) -> None:
        await self.comm.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))

    async def receive(self, timeout: float = 5) -> dict:
        frame = json.loads(await self.comm.receive_from(timeout=timeout))
        self.frames.append(frame)
        return frame

    async def receive_until(self, predicate, timeout: float = 10) -> dict:
        """Receive frames until one satisfies ``predicate``; returns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; got {[f['type'] for f in self.frames]}")
            frame = await self.receive(timeout=remaining)
            if predicate(frame):
                return frame

    async def receive_type(self, kind: str, timeout: float = 10) -> dict:
        return await self.receive_until(lambda f: f["type"] == kind, timeout)

    def deltas(self, message_id=None) -> list[dict]:
        return [
            f for f in self.frames
            if f["type"] == "delta" and (message_id is None or f["message_id"] == message_id)
        ]

    def text(self, message_id) -> str:
        return "".join(f["content"] for f in self.deltas(message_id))

    async def close(self) -> None:
        await self.comm.disconnect()


async def close_left_open(sockets: list[ChatSocket]) -> None:
    """Disconnect the sockets whose application still runs (a test may have closed
    some, or torn them down by cancelling their application)."""
    for sock in sockets:
        if not sock.comm.future.done():
            try:
                await sock.comm.disconnect()
            except (Exception, asyncio.CancelledError):  # noqa: BLE001 - best effort
                pass


class _TransportStub:
    """What chatproject.server.FlowControl asks of a Twisted transport when it pauses
    reading; in process there is no socket to pause."""

    def pauseProducing(self):  # noqa: N802 - Twisted's interface
        pass

    def resumeProducing(self):  # noqa: N802
        pass


class _ProtocolStub:
    transport = _TransportStub()


def server_queue():
    """A connection's queue as chatproject.server's ChatServer makes it."""
    from chatproject.server import FlowControl, InboundQueue

    return InboundQueue(FlowControl(_ProtocolStub()))


class ServerCommunicator(WebsocketCommunicator):
    """A WebsocketCommunicator whose input queue is the one ChatServer gives each
    connection (asgiref's ``input_queue`` property), so the consumer dispatches as it
    does under the live server."""

    _server_queue = None

    @property
    def input_queue(self):
        if self._server_queue is None:
            self._server_queue = server_queue()
        return self._server_queue


@pytest.fixture
async def connect():
    """``await connect(user, conversation_id)`` -> (connected, close_code, ChatSocket);
    the sockets still open are closed at the end of the test."""
    from chatproject.asgi import application

    sockets: list[ChatSocket] = []

    async def _connect(user=None, conversation_id=None, *, cookie=None):
        conversation_id = conversation_id or uuid.uuid4()
        headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
        if user is not None:
            from asgiref.sync import sync_to_async

            cookie = cookie or await sync_to_async(session_cookie)(user)
        if cookie:
            headers.append((b"cookie", cookie.encode()))
        communicator = ServerCommunicator(
            application, f"/ws/conversations/{conversation_id}/", headers=headers
        )
        connected, code = await communicator.connect(timeout=5)
        sock = ChatSocket(communicator)
        sockets.append(sock)
        return connected, code, sock

    yield _connect
    await close_left_open(sockets)


# --- live servers -------------------------------------------------------------------------
@pytest.fixture
def asgi_servers(transactional_db, upstream):
    """``asgi_servers(**env)`` starts a daphne process on the test database, pointed at
    the test upstream; all are stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(name: str = "live", **env) -> LiveServer:
        server = LiveServer(
            {
                "OPENAI_BASE_URL": upstream.base_url,
                "OPENAI_API_KEY": "test-key-not-secret",
                "OPENAI_MAX_RETRIES": "0",
                "CHAT_MODEL": "test-model",
                **env,
            },
            name=name,
        ).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def asgi_server(asgi_servers):
    """One live daphne server process."""
    return asgi_servers()
