"""The provider client's sockets on asyncio itself: an httpcore2 network backend
(:class:`AsyncioBackend`, given to the transport with httpcore2's public
``network_backend=``) for the SDK's HTTP client.

httpcore2's default backend reads through anyio, whose ``SocketStream.receive``
resumes and pauses the transport's reading around every read (an epoll register and
unregister per read) inside a cancel scope per read: at one read per token, the
largest cost of a busy worker's event loop. Here each connection is an
``asyncio.Protocol`` that keeps reading into a buffer: a read returns what is buffered
and waits only when nothing is; the read timeout is one timer per connection, re-armed
lazily. Reading pauses only when the reader falls ``_HIGH_WATER`` bytes behind (TCP
back-pressure on the provider). Errors are httpcore2's, which httpx2 and the SDK map
as with the default backend. Closing aborts the transport, also when the reader is
cancelled at any await (a stop closes the upstream at once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import ssl
from collections.abc import Iterable

import httpcore2

# Buffered bytes above which the socket is no longer read (until a read drains them).
_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One socket's protocol and its read buffer; the transport keeps reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.loop = asyncio.get_running_loop()
        # Read tick (s; 0: wake the reader on every data_received): the reader is woken
        # a tick after the first chunk it has not seen, with every chunk of that tick
        # (one task step, one coalesced frame, one socket write per batch). One timer
        # per connection: a loop-wide tick would wake every stream in one burst, which
        # delays stops and other sockets' frames. It applies only once the reader asks
        # (AsyncioStream.batch_reads, after the answer's first text), so the headers
        # and the first token never wait for it.
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
