"""HTTP to the API origin: one keep-alive session, the key on API calls only, and
every answer classified into a result or one error by a pure function.

This module never sleeps or retries. ``classify`` is the single table from
(HTTP status, body) to what the caller may do next: retry, stop the run, or
count a submit as a possible duplicate.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batch import __version__
from batch.errors import ApiError, AuthError, OutputError, UsageError
from batch.gate import RequestGate
from batch.metrics import Metrics
from batch.redact import redact_text
from batch.retry import parse_retry_after
from batch.urls import check_base_url

MAX_JSON_BYTES = 1024 * 1024
# A 500/502/504 may come from a proxy after the server took the request; 503 and 429
# are refusals before any work.
OUTCOME_UNKNOWN_STATUSES = frozenset({500, 502, 504})
# The most connections a run keeps open, whatever its --concurrency: a task waiting
# between polls holds none, so 10,000 in flight need far fewer sockets (and fds).
MAX_CONNECTIONS = 512
CREDIT_WORDS = re.compile(r"insufficient|balance|credit|top.?up|quota exhausted", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request limits in seconds, as the vendor's SDKs set them."""

    connect: float = 10.0
    submit: float = 60.0
    poll: float = 30.0
    upload: float = 120.0
    download: float = 120.0

    def for_request(self, read: float) -> aiohttp.ClientTimeout:
        """Per-read and whole-request limits: a body that trickles in a byte at a time
        never trips a read timeout, so the whole exchange has one too."""
        return aiohttp.ClientTimeout(
            total=self.connect + read, connect=self.connect, sock_read=read
        )


def connection_pool(concurrency: int) -> int:
    """Connections for a run of ``concurrency`` workers: one each and a few spare for
    keep-alive, up to ``MAX_CONNECTIONS``."""
    return min(concurrency + 8, MAX_CONNECTIONS)


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def decode_body(body: bytes) -> Any:
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError:
        return {"message": body[:200].decode(errors="replace")}


def classify(
    status: int, payload: Any, retry_after: str | None, what: str
) -> ApiError | AuthError | None:
    """None when ``payload`` is a success envelope with a ``data`` object; else the error.

    Any 2xx or 3xx that is not that envelope may still have done its work (a submit
    may have created a task), so it is ``outcome_unknown``.
    """
    envelope_code = payload.get("code") if isinstance(payload, dict) else None
    if isinstance(envelope_code, bool) or not isinstance(envelope_code, int):
        envelope_code = None
    data = payload.get("data") if isinstance(payload, dict) else None
    if 200 <= status < 300:
        if what == "models" and isinstance(data, list) and envelope_code in (None, 200):
            return None  # the catalogue's answer is a list; every other answer an object
        if isinstance(data, dict) and (
            envelope_code in (None, 200) or isinstance(data.get("id"), str)
        ):
            # A task id with a non-200 code (a sync submit timing out with 5004) is
            # still a task: the poll says how it ends.
            return None
        if envelope_code is not None and (
            envelope_code == 429 or 400 <= envelope_code < 500 or 1000 <= envelope_code < 2000
        ):
            # A refusal told in the body of an HTTP 200: nothing was created.
            status = envelope_code if envelope_code < 1000 else 400
        else:
            return ApiError(
                f"{what}: HTTP {status} with no usable answer; the request may have taken effect",
                status=status,
                code=envelope_code,
                retryable=True,
                outcome_unknown=True,
            )
    elif 300 <= status < 400:
        return ApiError(
            f"{what}: unexpected redirect (HTTP {status}); not following it with the key",
            status=status,
            retryable=False,
            outcome_unknown=True,
        )
    message = ""
    code: int | None = None
    if isinstance(payload, dict):
        message = str(payload.get("message") or payload.get("error") or "")
        raw_code = payload.get("error_code", payload.get("code"))
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
    message = message[:300]
    detail = f" ({message})" if message else ""
    if status == 401:
        return AuthError(
            f"the API refused the key (HTTP 401){detail}. Check WAVESPEED_API_KEY or "
            "--api-key-file; a new key works only after the account's first top-up."
        )
    if status == 402 or (status in (400, 403) and CREDIT_WORDS.search(message)):
        return AuthError(f"the account cannot pay for tasks (HTTP {status}){detail}. Top up.")
    if status == 403:
        return AuthError(
            f"the API denied access (HTTP 403){detail}. The account may be suspended "
            "or the key may lack permission for this model."
        )
    if status == 429:
        return ApiError(
            f"{what}: rate limited (HTTP 429){detail}",
            status=status,
            code=code,
            retryable=True,
            retry_after=parse_retry_after(retry_after),
        )
    if status >= 500:
        return ApiError(
            f"{what}: server error (HTTP {status}){detail}",
            status=status,
            code=code,
            retryable=True,
            outcome_unknown=status in OUTCOME_UNKNOWN_STATUSES,
            retry_after=parse_retry_after(retry_after),
        )
    return ApiError(
        f"{what}: refused (HTTP {status}){detail}", status=status, code=code, retryable=False
    )


def transport_error(exc: BaseException, what: str) -> ApiError:
    """A request that got no HTTP answer: was it sent?"""
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Refused before anything was sent: a submit created nothing.
        return ApiError(f"{what}: cannot connect ({exc.os_error})", retryable=True)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # No connection in time (a full pool or a slow connect): nothing was sent either.
        return ApiError(f"{what}: no connection in time", retryable=True)
    if isinstance(exc, TimeoutError):
        return ApiError(f"{what}: no answer in time", retryable=True, outcome_unknown=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return ApiError(
            f"{what}: connection dropped before the answer", retryable=True, outcome_unknown=True
        )
    return ApiError(
        f"{what}: {type(exc).__name__}: {str(exc)[:200]}", retryable=True, outcome_unknown=True
    )


async def read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    length = resp.content_length
    if length is not None and length > cap:
        raise OutputError(
            f"{what}: answer of {length} bytes is over the {cap} byte limit", retryable=False
        )
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(65536):
        total += len(chunk)
        if total > cap:
            raise OutputError(f"{what}: answer is over the {cap} byte limit", retryable=False)
        chunks.append(chunk)
    return b"".join(chunks)


class Transport:
    """The session, and calls to the API origin with the key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeouts: Timeouts | None = None,
        connections: int = 100,
        metrics: Metrics | None = None,
    ) -> None:
        if not api_key:
            raise UsageError("no API key: set WAVESPEED_API_KEY or pass --api-key-file")
        self.base_url = check_base_url(base_url)
        self.api_origin = origin(self.base_url)
        self._key = api_key
        self.timeouts = timeouts or Timeouts()
        self.metrics = metrics or Metrics()
        self._connections = connections
        self.gate = RequestGate(connections)  # every request to any origin passes it
        self._session: aiohttp.ClientSession | None = None
        self.identity = {
            "User-Agent": f"wsbatch/{__version__}",
            "X-Client-Name": "wsbatch",
            "X-Client-Version": __version__,
            "X-Client-OS": f"{platform.system()}/{platform.release()}".lower(),
        }

    async def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._connections, ttl_dns_cache=300, keepalive_timeout=30
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": self.identity["User-Agent"]},
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect),
                raise_for_status=False,
            )

    async def close(self) -> None:
        await self.gate.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("client is not open")
        return self._session

    def scrub(self, text: str) -> str:
        """A server's text made safe to record: no key, no secret inside a URL."""
        # A key too short to be real (a test's) would mangle every word it occurs in.
        text = text.replace(self._key, "***") if len(self._key) >= 8 else text
        return redact_text(text)

    def auth_header(self, url: str) -> dict[str, str]:
        """The key, for the API's own origin only: never a CDN's or storage's."""
        return {"Authorization": f"Bearer {self._key}"} if origin(url) == self.api_origin else {}

    async def api(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        read_timeout: float,
        max_bytes: int = MAX_JSON_BYTES,
        what: str,
        data: Any = None,
    ) -> dict[str, Any]:
        """One request to the API origin; returns ``data`` of the envelope."""
        headers = {**self.identity, "Authorization": f"Bearer {self._key}"}
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        self.metrics.requests += 1
        try:
            async with (
                self.gate,
                self.session.request(
                    method,
                    self.base_url + path,
                    data=json.dumps(json_body) if json_body is not None else data,
                    headers=headers,
                    timeout=self.timeouts.for_request(read_timeout),
                    allow_redirects=False,
                ) as resp,
            ):
                body = await read_capped(resp, max_bytes, what)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (ApiError, AuthError, OutputError):
            raise
        except Exception as exc:
            lost = transport_error(exc, what)
            lost.message = self.scrub(lost.message)
            lost.args = (lost.message,)
            raise lost from None
        self.metrics.by_status[status] += 1
        payload = decode_body(body)
        error = classify(status, payload, retry_after, what)
        if error is not None:
            text = self.scrub(str(error))
            if isinstance(error, ApiError):
                error.message = text
            error.args = (text,)
            raise error
        result: dict[str, Any] = payload["data"]
        return result
