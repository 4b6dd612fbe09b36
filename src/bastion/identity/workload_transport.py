"""HTTP/1.1 requests sent in one write: an httpcore network backend.

httpcore writes a request's head (request line and headers) and its body
separately. Over TLS (RFC 8446 section 5) each write is a record that the
client seals and the server opens on its own, and a read the server wakes
for: on the api -> gateway path that doubled the per-request TLS work for a
body of a few kilobytes. :class:`OneWriteBackend` holds a connection's writes
until it first reads (HTTP/1.1 sends the whole request before it reads the
response, RFC 9112 section 9.3) or until 64 KiB are held, then sends them as
one. TLS, certificate checks and timeouts are the wrapped backend's.

:class:`LoopBackend` is that wrapped backend on the api -> gateway path: a
connection on the event loop's own transport (``asyncio.open_connection``,
``StreamWriter.start_tls``), so that under uvloop its TLS records are sealed
and opened in uvloop's compiled TLS layer instead of AnyIO's Python one
(httpcore's default), which cost the api about 0.1 ms of CPU per call. The
handshake is the same context's, with its SPIFFE check
(:meth:`~bastion.identity.workload.WorkloadTls.client_context`).
"""

from __future__ import annotations

import asyncio
import ssl
import typing

import httpcore

# Above this much held, a write goes out at once (a large upload streams).
MAX_HELD_BYTES = 64 * 1024


class OneWriteStream(httpcore.AsyncNetworkStream):
    """A network stream whose writes wait for the next read (or 64 KiB)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._held: list[bytes] = []
        self._held_bytes = 0

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held.append(buffer)
        self._held_bytes += len(buffer)
        if self._held_bytes > MAX_HELD_BYTES:
            await self.flush(timeout)

    async def flush(self, timeout: float | None = None) -> None:
        """Send what is held, as one write."""
        if not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        await self._inner.write(held[0] if len(held) == 1 else b"".join(held), timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self.flush(timeout)
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held, self._held_bytes = [], 0
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        await self.flush(timeout)
        return OneWriteStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class LoopStream(httpcore.AsyncNetworkStream):
    """A connection on the running loop's transport, as httpcore reads and writes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("read timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("write timed out") from None
        except (OSError, ssl.SSLError, RuntimeError) as exc:  # RuntimeError: closed transport
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        # The transport sends close_notify and closes; nothing is left to wait for.
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:  # WrongPeer is an SSLError
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            # An idle keep-alive connection the server closed (or reset): the
            # loop has already read its end, so httpcore opens a new one.
            return self._reader.at_eof() or self._writer.is_closing()
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        if name in ("ssl_object", "sockname", "peername", "socket"):
            return self._writer.get_extra_info(name)
        return None


async def _connected(
    opening: typing.Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    timeout: float | None,
) -> LoopStream:
    """The stream ``opening`` connects, within ``timeout``, errors as httpcore's."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await opening
    except TimeoutError:
        raise httpcore.ConnectTimeout("connect timed out") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    return LoopStream(reader, writer)


class LoopBackend(httpcore.AsyncNetworkBackend):
    """TCP connections on the running loop (its TLS, for ``start_tls``)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        stream = await _connected(asyncio.open_connection(host, port, local_addr=local), timeout)
        sock = stream.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)  # the loop sets TCP_NODELAY itself
        return stream

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await _connected(asyncio.open_unix_connection(path), timeout)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class OneWriteBackend(httpcore.AsyncNetworkBackend):
    """A backend (httpcore's AnyIO one by default) whose streams are wrapped in
    :class:`OneWriteStream`."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return OneWriteStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return OneWriteStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
