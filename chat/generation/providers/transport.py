"""An httpx2 transport whose connections are read on asyncio directly
(.netstream.AsyncioBackend), for the SDK's HTTP client, and the two things the provider
does to a response's connection from outside its reader: batch its reads once the
first text is in (:func:`batch_reads`) and hang it up on a stop (:func:`hang_up`).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterable

import httpcore2
import httpx2

from .netstream import AsyncioBackend, AsyncioStream


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
    two later. A response on another backend is left to its reader's cancellation."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, AsyncioStream):
        stream.hang_up()



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
