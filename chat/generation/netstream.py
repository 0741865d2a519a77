"""The provider client's sockets on asyncio itself: an httpcore2 network backend
(:class:`AsyncioBackend`) for the SDK's HTTP client (issue 11, the upstream reader's
CPU per token).

httpcore2's default backend reads through anyio, and anyio's ``SocketStream.receive``
resumes the transport's reading before every read and pauses it after (an epoll
``register``/``unregister`` per read: 17 % of the worker's event loop at K = 200, py-spy,
docs/performance.md) inside a ``fail_after`` cancel scope (``asyncio.current_task``
through sniffio per read: 7 %). Here each connection is an ``asyncio.Protocol`` that
keeps reading into a buffer: a read returns what is buffered at once and waits only
when nothing is, and the read timeout is one timer per connection, re-armed lazily,
instead of a cancel scope per read. Reading pauses only when the reader falls
``_HIGH_WATER`` bytes behind (TCP back-pressure on the provider, as before).

Errors are httpcore2's (``ConnectError``, ``ConnectTimeout``, ``ReadError``,
``ReadTimeout``, ``WriteError``, ``WriteTimeout``), which httpx2 maps to its own and the
SDK to ``APIConnectionError`` / ``APITimeoutError``, as with the default backend.
Closing aborts the transport: the socket is closed on the loop's next iteration, also
when the reader is cancelled at any await (a stop closes the upstream at once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import ssl
from collections.abc import Iterable

import httpcore2
import httpx2

# Buffered bytes above which the socket is no longer read (until a read drains them).
_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One socket's protocol and its read buffer; the transport keeps reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.loop = asyncio.get_running_loop()
        # Read tick (s; 0: wake the reader on every data_received): the reader is woken
        # a tick after the first chunk it has not seen, with every chunk of that tick.
        # At 20 tokens/s a stream's chunks arrive ~50 ms apart, so a wake carries
        # several (one task step, one coalesced frame, one socket write per batch). One
        # timer per connection, not one for the loop: a shared tick woke every stream
        # in the same loop iteration, a burst that delayed stops and other sockets'
        # frames by tens of ms (lag p99 324 vs 105 ms at K=200). The tick applies only
        # once the reader asked for it (AsyncioStream.batch_reads: the upstream does
        # after the answer's first text), so a response's headers and first token
        # (TTFT) never wait for it.
        self.tick = tick
        self.tick_handle: asyncio.TimerHandle | None = None
        self.batching = False
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.lost: BaseException | None = None
        self.closed = False
        self.paused = False
        self.waiter: asyncio.Future | None = None
        # A cancellation that arrived while bytes were buffered (see wait_readable).
        self.cancel_deferred = False
        self.drained: asyncio.Future | None = None
        # The read timeout: one timer per connection, checked when it fires.
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > _HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if not self.batching:
            self._wake()
        elif self.tick_handle is None and self.waiter is not None:
            self.tick_handle = self.loop.call_later(self.tick, self._tick)

    def _tick(self) -> None:
        self.tick_handle = None
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    # -- reading ------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_deadline(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done() or self.deadline == math.inf:
            return
        if self.chunks:  # data waiting for the read tick: not a timeout
            waiter.set_result(None)
        elif self.loop.time() >= self.deadline:
            waiter.set_exception(TimeoutError())
        else:
            self.timer = self.loop.call_at(self.deadline, self._check_deadline)

    async def wait_readable(self, timeout: float | None) -> None:
        """Wait until a read has something to return; TimeoutError after ``timeout`` s."""
        self.waiter = self.loop.create_future()
        if timeout is None:
            self.deadline = math.inf  # a timer armed by an earlier read stays quiet
        else:
            # A later deadline does not re-arm the timer: it re-arms itself when it fires.
            self.deadline = self.loop.time() + timeout
            if self.timer is not None and self.timer.when() > self.deadline:
                self.forget_timer()
            if self.timer is None:
                self.timer = self.loop.call_at(self.deadline, self._check_deadline)
        try:
            await self.waiter
        except asyncio.CancelledError:
            # Bytes the provider already sent (waiting for the read tick, or for the
            # reader's next step) are part of the answer: a stop must not drop them, or
            # the saved text and its usage miss the tokens the provider counted. The
            # read returns them, and the cancellation is raised again at the reader's
            # next wait: a read finding nothing buffered (AsyncioStream.read), or any
            # other await (_resume_cancel), so a stop still closes the stream at once.
            if not self.chunks:
                raise
            self.cancel_deferred = True
            self.loop.call_soon(self._resume_cancel, asyncio.current_task())
        finally:
            self.waiter = None

    def _resume_cancel(self, task: asyncio.Task) -> None:
        # Runs once the reader's step has ended, wherever it now waits. An
        # asyncio.timeout that expired uncancels its task when its block ends
        # (cancelling() back to 0): that one was a timeout that data answered, not a stop.
        if self.cancel_deferred:
            self.cancel_deferred = False
            if not task.done() and task.cancelling():
                task.uncancel()
                task.cancel()

    def take(self, max_bytes: int) -> bytes:
        chunks = self.chunks
        data = chunks.popleft()
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        else:
            while chunks and len(data) + len(chunks[0]) <= max_bytes:
                data += chunks.popleft()
        self.size -= len(data)
        if self.paused and self.size <= _HIGH_WATER // 4 and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def forget_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class AsyncioStream(httpcore2.AsyncNetworkStream):
    """One connection to the provider, as httpcore2 reads and writes it."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` bytes; b"" at the end of the stream. Raises
        httpcore2.ReadTimeout after ``timeout`` s without data, httpcore2.ReadError
        when the connection broke or was closed here, CancelledError when the reader
        was cancelled (after the bytes buffered at that moment were returned)."""
        connection = self._connection
        if not connection.chunks:
            # Before the end checks: a stop hangs the connection up (hang_up) and the
            # reader, once its buffered bytes are read, ends cancelled, not with an error.
            if connection.cancel_deferred:
                connection.cancel_deferred = False
                task = asyncio.current_task()
                # Still wanted: an asyncio.timeout that expired has uncancelled it.
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
            if not connection.eof and not connection.closed:
                try:
                    await connection.wait_readable(timeout)
                except TimeoutError:
                    raise httpcore2.ReadTimeout("timed out reading from the server") from None
        if connection.chunks:
            return connection.take(max_bytes)
        if connection.lost is not None:
            raise httpcore2.ReadError(str(connection.lost)) from connection.lost
        if connection.closed and not connection.eof:
            raise httpcore2.ReadError("the connection is closed")
        return b""

    def batch_reads(self) -> None:
        """From now until the next request on this connection, wake a waiting reader a
        read tick after the first unread chunk instead of per chunk (no-op when the
        backend's ``read_tick`` is 0)."""
        self._connection.batching = self._connection.tick > 0

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send ``buffer``; waits while the transport's write buffer is full. Raises
        httpcore2.WriteError on a closed connection, WriteTimeout after ``timeout`` s."""
        if not buffer:
            return
        connection = self._connection
        if connection.closed or connection.transport.is_closing():
            raise httpcore2.WriteError("the connection is closed")
        # A new request on this connection: its response is read per chunk until its
        # reader asks for batches again.
        connection.batching = False
        connection.transport.write(buffer)
        if connection.drained is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(connection.drained)
            except TimeoutError:
                raise httpcore2.WriteTimeout("timed out writing to the server") from None
            if connection.closed:
                raise httpcore2.WriteError(str(connection.lost or "the connection is closed"))

    async def aclose(self) -> None:
        """Close at once (:meth:`hang_up`)."""
        self.hang_up()

    def hang_up(self) -> None:
        """Close at once (unsent bytes dropped), with no await a cancellation could
        interrupt: the FIN goes out now (``write_eof``: the provider sees the end of a
        stopped stream without waiting for a busy loop's next iteration, as anyio's
        ``aclose`` does) and the socket is closed on the loop's next iteration. Bytes
        already received can still be read; then reads raise httpcore2.ReadError."""
        connection = self._connection
        connection.forget_timer()
        transport = connection.transport
        if transport is not None and not transport.is_closing():
            if transport.can_write_eof() and not transport.get_write_buffer_size():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            transport.abort()
        connection.closed = True

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:
        """The same connection under TLS. Raises httpcore2.ConnectError (handshake or
        certificate failure), ConnectTimeout after ``timeout`` s."""
        connection = self._connection
        try:
            async with asyncio.timeout(timeout):
                transport = await connection.loop.start_tls(
                    connection.transport, connection, ssl_context,
                    server_hostname=server_hostname)
        except TimeoutError:
            await self.aclose()
            raise httpcore2.ConnectTimeout("timed out during the TLS handshake") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            await self.aclose()
            raise httpcore2.ConnectError(str(exc)) from exc
        connection.transport = transport
        return self

    def get_extra_info(self, info: str):
        """What httpcore2 asks of a stream: ``ssl_object``, ``client_addr``,
        ``server_addr``, ``socket``, ``is_readable`` (an idle connection that has data,
        an end or an error waiting is not reused)."""
        connection = self._connection
        transport = connection.transport
        if info == "is_readable":
            return bool(connection.chunks) or connection.eof or connection.closed
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


def batch_reads(response) -> None:
    """Batch the reads of an httpx2 response's connection (AsyncioStream.batch_reads);
    a response on another backend, or an upgraded connection, is left as it is."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, AsyncioStream):
        stream.batch_reads()


def hang_up(response) -> None:
    """Close an httpx2 response's connection now, from outside its reader and without
    an await (AsyncioStream.hang_up): a stop reaches the provider in the step that asks
    for it, not when the reading task next runs, which on a busy event loop is a pass or
    two later (issue 11: stop -> upstream close p99). A response on another backend is
    left to its reader's cancellation."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, AsyncioStream):
        stream.hang_up()


class AsyncioBackend(httpcore2.AsyncNetworkBackend):
    """httpcore2's network backend on asyncio protocols (module docstring). Only for
    an asyncio event loop (the worker's). ``read_tick`` (s): readers waiting for data
    are woken a tick after their first unread chunk instead of per chunk (0: off);
    the first bytes, the end, errors and a close are never delayed."""

    def __init__(self, read_tick: float = 0.0) -> None:
        self.read_tick = read_tick

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable | None = None) -> AsyncioStream:
        """A connected stream; raises httpcore2.ConnectError / ConnectTimeout."""
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await _connect(lambda connection: loop.create_connection(
            lambda: connection, host, port, local_addr=local), timeout, socket_options,
            self.read_tick)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable | None = None) -> AsyncioStream:
        """A stream on a Unix socket; raises httpcore2.ConnectError / ConnectTimeout."""
        loop = asyncio.get_running_loop()
        return await _connect(lambda connection: loop.create_unix_connection(
            lambda: connection, path), timeout, socket_options, self.read_tick)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(open_connection, timeout, socket_options,
                   read_tick: float = 0.0) -> AsyncioStream:
    connection = _Connection(read_tick)
    try:
        async with asyncio.timeout(timeout):
            await open_connection(connection)
    except TimeoutError:
        raise httpcore2.ConnectTimeout("timed out connecting to the server") from None
    except OSError as exc:
        raise httpcore2.ConnectError(str(exc)) from exc
    sock = connection.transport.get_extra_info("socket")
    try:
        for option in socket_options or ():
            sock.setsockopt(*option)
    except OSError as exc:
        connection.transport.abort()
        raise httpcore2.ConnectError(str(exc)) from exc
    return AsyncioStream(connection)


# httpcore2's errors as httpx2's (the SDK maps httpx2's to APIConnectionError and
# APITimeoutError), most specific first: httpx2's own transport maps them the same way.
_ERRORS: tuple[tuple[type[Exception], type[httpx2.HTTPError]], ...] = (
    (httpcore2.ConnectTimeout, httpx2.ConnectTimeout),
    (httpcore2.ReadTimeout, httpx2.ReadTimeout),
    (httpcore2.WriteTimeout, httpx2.WriteTimeout),
    (httpcore2.PoolTimeout, httpx2.PoolTimeout),
    (httpcore2.TimeoutException, httpx2.TimeoutException),
    (httpcore2.ConnectError, httpx2.ConnectError),
    (httpcore2.ReadError, httpx2.ReadError),
    (httpcore2.WriteError, httpx2.WriteError),
    (httpcore2.NetworkError, httpx2.NetworkError),
    (httpcore2.ProxyError, httpx2.ProxyError),
    (httpcore2.UnsupportedProtocol, httpx2.UnsupportedProtocol),
    (httpcore2.LocalProtocolError, httpx2.LocalProtocolError),
    (httpcore2.RemoteProtocolError, httpx2.RemoteProtocolError),
    (httpcore2.ProtocolError, httpx2.ProtocolError),
)


@contextlib.contextmanager
def _httpx_errors():
    """Raise httpcore2's exceptions as the matching httpx2 ones (``_ERRORS``)."""
    try:
        yield
    except Exception as exc:
        for core, mapped in _ERRORS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseStream(httpx2.AsyncByteStream):
    """A response body from the pool, its errors mapped to httpx2's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    async def __aiter__(self):
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        with _httpx_errors():
            await self._stream.aclose()


class AsyncioTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport (the documented custom-transport interface,
    ``handle_async_request``) over an ``httpcore2.AsyncConnectionPool`` whose
    connections use :class:`AsyncioBackend`, given through the pool's public
    ``network_backend`` argument (httpx2's own transport takes no backend).

    ``read_tick`` (s): :class:`AsyncioBackend`. ``verify``, ``cert``, ``trust_env``:
    the TLS context, as ``httpx2.create_ssl_context``. ``limits``: an
    ``httpx2.Limits`` (default: httpx2's). ``http1``, ``http2``, ``retries``,
    ``local_address``, ``uds``, ``socket_options``: the pool's. No proxy: the SDK's
    client mounts its own transport for proxies from the environment.
    """

    def __init__(self, read_tick: float = 0.0, *, verify: ssl.SSLContext | str | bool = True,
                 cert=None, trust_env: bool = True, limits: httpx2.Limits | None = None,
                 http1: bool = True, http2: bool = False, retries: int = 0,
                 local_address: str | None = None, uds: str | None = None,
                 socket_options: Iterable | None = None) -> None:
        limits = limits or httpx2.Limits(max_connections=100, max_keepalive_connections=20)
        self.pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1, http2=http2, retries=retries, local_address=local_address,
            uds=uds, socket_options=socket_options,
            network_backend=AsyncioBackend(read_tick),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` on the pool; raises httpx2's transport errors
        (``ConnectError``, ``ReadTimeout``, ...)."""
        core_request = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                              port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = await self.pool.handle_async_request(core_request)
        return httpx2.Response(status_code=response.status, headers=response.headers,
                               stream=_ResponseStream(response.stream),
                               extensions=response.extensions)

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self.pool.aclose()
