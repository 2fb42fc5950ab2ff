"""The inference data path to one engine replica: pooled keep-alive HTTP/1.1 with a C response parser.

Control calls (health, /metrics, /version) stay on httpx; every token of every stream passes through
here, so this client is aiohttp's (its C parser and plain-bytes reads cost a fraction of httpx's
per-chunk work). Cookies, redirects and automatic decompression are off: an engine uses none of them.
"""

from __future__ import annotations

import aiohttp
from yarl import URL

# No overall or read timeout: streams legitimately run long; the watchdog detects hung engines.
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0, sock_read=None)
# Shorter than the engines' own idle timeout (uvicorn's and so vLLM's: 5 s), so the pool never sends a
# request on a connection the engine is closing at that moment.
KEEPALIVE_S = 3.0

EngineResponse = aiohttp.ClientResponse
EngineConnectError = aiohttp.ClientConnectorError
EngineTransportError = aiohttp.ClientError


class EngineDataClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=None)
        return aiohttp.ClientSession(
            connector=connector, timeout=_TIMEOUT, cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path, encoded=True)
        return url

    async def post(self, path: str, payload: bytes, request_id: str) -> EngineResponse:
        """Send one request and return once the engine's status line and headers have arrived."""
        session = self._session
        if session is None or session.closed:
            session = self._session = self._open_session()
        return await session.post(
            self._url(path), data=payload, allow_redirects=False,
            headers={"content-type": "application/json", "x-request-id": request_id},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def finish(response: EngineResponse) -> None:
    """Read what is left of a finished answer so its connection goes back to the pool."""
    try:
        await response.read()
    except aiohttp.ClientError:
        response.close()
    finally:
        response.release()


def abort(response: EngineResponse) -> None:
    """Drop the connection mid-answer: the engine sees the client go and aborts the request."""
    response.close()
