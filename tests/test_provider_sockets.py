"""The provider client reads its sockets on asyncio itself
(chat.generation.providers.netstream): one readiness registration per connection
instead of two epoll changes per read, a read timeout that still fires, and TCP
back-pressure when the reader falls behind. Real loopback sockets and the loopback
upstream; no mocks."""

import asyncio
import contextlib
import datetime
import ipaddress
import ssl

import httpcore2
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chat.generation.providers import chat_completions, netstream, transport
from tests.eventually import eventually

TOKENS = 40


async def _silent_then(server_writes):
    """A loopback server running ``server_writes(writer)`` for its one client; returns
    ``(server, port)``."""

    async def handle(reader, writer):
        with contextlib.suppress(ConnectionError):
            await server_writes(writer)
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_reading_a_stream_does_not_change_the_sockets_registration_per_chunk(
        upstream, settings):
    upstream.answer = " ".join(f"w{i}" for i in range(TOKENS))
    upstream.tokens_per_second = 400
    selector = asyncio.get_running_loop()._selector
    changes = []
    originals = {name: getattr(selector, name) for name in ("register", "unregister", "modify")}

    def counting(name):
        def call(*args, **kwargs):
            changes.append(name)
            return originals[name](*args, **kwargs)
        return call

    client = chat_completions.new_client(settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY)
    events = chat_completions.stream_answer(
        client, model="test-model", messages=[{"role": "user", "content": "hi"}],
        max_tokens=100, label="sockets")
    for name in originals:
        setattr(selector, name, counting(name))
    try:
        async with contextlib.aclosing(events):
            text = "".join([event.content async for event in events])
    finally:
        for name, original in originals.items():
            setattr(selector, name, original)
        await client.close()
    assert text == upstream.answer
    # anyio's reads made two changes per chunk (resume, then pause reading): 80 here.
    assert len(changes) <= 10, changes


async def test_a_silent_server_times_the_read_out_and_a_talking_one_does_not():
    async def talk_slowly(writer):
        await asyncio.sleep(0.6)
        for _ in range(10):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)

    server, port = await _silent_then(talk_slowly)
    stream = await netstream.AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
    try:
        with pytest.raises(httpcore2.ReadTimeout):
            await stream.read(1024, timeout=0.4)
        # Bytes every 0.1 s for 1 s: a 0.35 s read timeout never fires, although the
        # connection's one timer was armed long before the last read.
        received = b""
        while len(received) < 10:
            received += await stream.read(1024, timeout=0.35)
        assert received == b"x" * 10
    finally:
        await stream.aclose()
        server.close()


async def test_a_reader_that_falls_behind_stops_reading_the_socket_until_it_catches_up():
    size = 32 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    writers = []

    async def flood(writer):
        writers.append(writer)
        writer.write(payload)
        writer.write_eof()
        await writer.drain()

    server, port = await _silent_then(flood)
    stream = await netstream.AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
    try:
        await eventually(lambda: writers)
        # Not read for a while: what the kernel cannot hold waits at the server.
        await asyncio.sleep(0.5)
        assert writers[0].transport.get_write_buffer_size() > 0
        received = bytearray()
        while chunk := await stream.read(64 * 1024, timeout=5):
            received += chunk
        assert received == payload
    finally:
        await stream.aclose()
        server.close()


async def test_closing_a_stream_tells_the_server_at_once():
    ended = asyncio.Event()

    async def handle(reader, writer):
        await reader.read()
        ended.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = await netstream.AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
    await stream.aclose()
    try:
        await asyncio.wait_for(ended.wait(), 1)
    finally:
        server.close()
    with pytest.raises(httpcore2.ReadError):
        await stream.read(10)


def _self_signed(tmp_path):
    """``(server_context, client_context)`` for a fresh self-signed certificate of
    127.0.0.1 (the client trusts only it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))


async def test_an_https_provider_is_read_through_tls_on_the_same_sockets(tmp_path):
    server_context, client_context = _self_signed(tmp_path)

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for n in range(3):
            event = b'data: {"n": %d}\n\n' % n
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    client = httpx2.AsyncClient(transport=transport.AsyncioTransport(verify=client_context))
    try:
        async with client.stream("GET", f"https://127.0.0.1:{port}/v1/x") as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert response.status_code == 200
        assert body == b"".join(b'data: {"n": %d}\n\n' % n for n in range(3))
        # A certificate the client does not trust is a connection error, as before.
        with pytest.raises(httpx2.ConnectError):
            await httpx2.AsyncClient(transport=transport.AsyncioTransport()).get(
                f"https://127.0.0.1:{port}/v1/x")
    finally:
        await client.aclose()
        server.close()


async def test_a_read_without_timeout_waits_past_an_earlier_reads_timeout():
    async def talk_twice(writer):
        await asyncio.sleep(0.1)  # the first read waits, arming the connection's timer
        writer.write(b"a")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(b"b")
        await writer.drain()

    server, port = await _silent_then(talk_twice)
    stream = await netstream.AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
    try:
        assert await stream.read(10, timeout=0.2) == b"a"
        # The timer of the first read fires while this one waits: it must not time out.
        assert await stream.read(10, timeout=None) == b"b"
    finally:
        await stream.aclose()
        server.close()


async def test_a_read_tick_wakes_the_reader_once_for_several_chunks_once_asked_but_not_the_end():
    async def talk(writer):
        writer.write(b"first")
        await writer.drain()
        await asyncio.sleep(0.3)
        for i in range(5):  # one chunk every 20 ms: a 150 ms tick carries several
            writer.write(b"%d" % i)
            await writer.drain()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        writer.write_eof()

    server, port = await _silent_then(talk)
    stream = await netstream.AsyncioBackend(read_tick=0.15).connect_tcp(
        "127.0.0.1", port, timeout=2)
    loop = asyncio.get_running_loop()
    try:
        # Until the reader asks for batches (after the answer's first text), no tick.
        assert await stream.read(1024, timeout=0.25) == b"first"
        stream.batch_reads()
        reads = []
        while len(b"".join(reads)) < 5:
            reads.append(await stream.read(1024, timeout=2))
        assert b"".join(reads) == b"01234"
        assert len(reads) < 5, reads
        # The end is delivered at once, not on the next tick.
        started = loop.time()
        assert await stream.read(1024, timeout=2) == b""
        assert loop.time() - started < 0.4
    finally:
        await stream.aclose()
        server.close()


async def _tick_server(later: bytes, delay: float):
    """A server that sends ``b"first"`` (a response's headers, read at once) and
    ``later`` ``delay`` s after it, then waits."""
    async def talk(writer):
        writer.write(b"first")
        await writer.drain()
        await asyncio.sleep(delay)
        writer.write(later)
        await writer.drain()
        await asyncio.sleep(5)

    return await _silent_then(talk)


async def _cancel_and_time(task: asyncio.Task) -> float:
    """Cancel ``task``, which must end cancelled; the seconds it took to end."""
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return loop.time() - stopped_at


@pytest.mark.parametrize("hung_up", [False, True], ids=["cancelled", "hung up, then cancelled"])
async def test_a_stopped_reader_gets_the_bytes_already_buffered_and_then_its_cancellation(
    hung_up,
):
    # A stop while the provider's tokens wait for the read tick: those tokens were
    # generated (and billed), so the run must read them before it closes the stream.
    # A stop hangs the connection up first (the provider stops at once), then cancels
    # the reader: the reader still ends cancelled (a stop), not with a read error (a
    # failed run).
    server, port = await _tick_server(b"three tokens", 0.15)
    stream = await netstream.AsyncioBackend(read_tick=2.0).connect_tcp(
        "127.0.0.1", port, timeout=2)
    received = []

    async def reader():
        while True:
            received.append(await stream.read(1024, timeout=5))

    try:
        task = asyncio.create_task(reader())
        await eventually(lambda: received == [b"first"])
        stream.batch_reads()
        await asyncio.sleep(0.3)  # "three tokens" is buffered, its tick 2 s away
        if hung_up:
            stream.hang_up()
        assert await _cancel_and_time(task) < 0.5
        assert received == [b"first", b"three tokens"]
        if hung_up:
            with pytest.raises(httpcore2.ReadError):
                await stream.read(1024, timeout=1)
    finally:
        await stream.aclose()
        server.close()


async def test_a_stop_deferred_for_buffered_bytes_lands_at_the_readers_next_await():
    # After the buffered bytes the reader waits elsewhere (a full outbox, say): the stop
    # must reach it there at once, not when that wait ends.
    server, port = await _tick_server(b"tokens", 0.05)
    stream = await netstream.AsyncioBackend(read_tick=2.0).connect_tcp(
        "127.0.0.1", port, timeout=2)
    received = []

    async def reader():
        received.append(await stream.read(1024, timeout=5))
        stream.batch_reads()
        received.append(await stream.read(1024, timeout=5))
        await asyncio.sleep(30)

    try:
        task = asyncio.create_task(reader())
        await asyncio.sleep(0.3)
        assert await _cancel_and_time(task) < 0.5
        assert received == [b"first", b"tokens"]
    finally:
        await stream.aclose()
        server.close()


async def test_a_timeout_that_buffered_bytes_answer_does_not_become_a_cancellation():
    # asyncio.timeout cancels the reader too; when data is buffered by then, the read
    # returns it and the reader goes on: the run was not stopped.
    server, port = await _tick_server(b"late", 0.1)
    stream = await netstream.AsyncioBackend(read_tick=2.0).connect_tcp(
        "127.0.0.1", port, timeout=2)
    try:
        assert await stream.read(1024, timeout=5) == b"first"
        stream.batch_reads()
        async with asyncio.timeout(0.4):  # expires while b"late" waits for its tick
            assert await stream.read(1024, timeout=5) == b"late"
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0.1)  # not cancelled
        with pytest.raises(httpcore2.ReadTimeout):
            await stream.read(1024, timeout=0.2)
    finally:
        await stream.aclose()
        server.close()


async def test_the_first_token_does_not_wait_for_the_read_tick_and_the_rest_comes_in_batches(
        upstream, settings):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(read_tick_ms=400)
    upstream.answer = " ".join(f"w{i}" for i in range(12))
    upstream.tokens_per_second = 20  # one token every 50 ms
    loop = asyncio.get_running_loop()
    client = chat_completions.new_client(settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY)
    arrivals = []
    started = loop.time()
    events = chat_completions.stream_answer(
        client, model="test-model", messages=[{"role": "user", "content": "hi"}],
        max_tokens=100, label="tick")
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                if event.content:
                    arrivals.append((loop.time(), event.content))
    finally:
        await client.close()
    assert "".join(text for _, text in arrivals) == upstream.answer
    # The first token is due 50 ms after the request: it is not held for the 400 ms tick.
    assert arrivals[0][0] - started < 0.3
    # The other 11 tokens (550 ms of them) arrive in a few reads, not one by one.
    times = [at for at, _ in arrivals[1:]]
    reads = 1 + sum(1 for a, b in zip(times, times[1:], strict=False) if b - a > 0.02)
    assert reads <= 3, [round(at - started, 3) for at, _ in arrivals]
