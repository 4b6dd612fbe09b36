"""HTTP/1.1 requests sent in one write: an httpcore network backend.

httpcore writes a request's head (request line and headers) and its body
separately. Over TLS (RFC 8446 section 5) each write is a record that the
client seals and the server opens on its own, and a read the server wakes
for: on the api -> gateway path that doubled the per-request TLS work for a
body of a few kilobytes. :class:`OneWriteBackend` holds a connection's writes
until it first reads (HTTP/1.1 sends the whole request before it reads the
response, RFC 9112 section 9.3) or until 64 KiB are held, then sends them as
one. TLS, certificate checks and timeouts are the wrapped backend's.
"""

from __future__ import annotations

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


class OneWriteBackend(httpcore.AsyncNetworkBackend):
    """httpcore's AnyIO backend, its streams wrapped in :class:`OneWriteStream`."""

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
