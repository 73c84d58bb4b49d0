"""The WaveSpeed v3 HTTP client: upload, submit, poll, download.

One aiohttp session with keep-alive. Every failure leaves here as a
classified error (``ApiError`` with ``retryable``/``outcome_unknown``,
``AuthError``, ``PredictionGone``, ``TaskFailed``, ``OutputError``); this
module never sleeps or retries, and runs nothing concurrently itself.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import mimetypes
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from batch import __version__
from batch.errors import ApiError, AuthError, OutputError, PredictionGone, TaskFailed, UsageError
from batch.images import sniff_image
from batch.retry import parse_retry_after

DEFAULT_BASE_URL = "https://api.wavespeed.ai"
DEFAULT_MAX_DOWNLOAD = 64 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
FAILED_STATUSES = frozenset({"failed", "cancelled", "canceled", "timeout"})
GONE_STATUSES = frozenset({"deleted"})
OUTCOME_UNKNOWN_STATUSES = frozenset({500, 502, 504})
CREDIT_WORDS = re.compile(r"insufficient|balance|credit|top.?up|quota exhausted", re.IGNORECASE)
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request limits in seconds, as the vendor's SDKs set them."""

    connect: float = 10.0
    submit: float = 60.0
    poll: float = 30.0
    upload: float = 120.0
    download: float = 120.0


@dataclass(frozen=True, slots=True)
class Prediction:
    id: str
    status: str
    outputs: tuple[str, ...] = ()
    nsfw: tuple[bool, ...] = ()
    error: str | None = None
    code: int | None = None
    inference_ms: int | None = None

    @property
    def done(self) -> bool:
        return self.status == "completed"


@dataclass(slots=True)
class ClientStats:
    requests: int = 0
    polls: int = 0
    submits: int = 0
    uploads: int = 0
    downloads: int = 0
    bytes_downloaded: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str) -> str:
    """Refuse base URLs that would leak the key: plain http is for loopback only."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"base URL {base_url!r} must be an http(s) URL")
    if parts.username or parts.password:
        raise UsageError("base URL must not carry credentials")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise UsageError(
            f"refusing plain http:// to {parts.hostname}: the API key would travel "
            "unencrypted; use https, or http only for a loopback emulator"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _parse_data_uri(value: str) -> bytes:
    header, _, payload = value.partition(",")
    if ";base64" not in header:
        raise OutputError("data: output is not base64", retryable=False)
    return _b64(payload)


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise OutputError("output is neither a URL nor valid base64", retryable=False) from None


class Client:
    """Talks to the API origin with the key, and to every other origin without it."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeouts: Timeouts | None = None,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD,
        connections: int = 100,
        upload_flow: str = "auto",
    ) -> None:
        if not api_key:
            raise UsageError("no API key: set WAVESPEED_API_KEY or pass --api-key-file")
        self.base_url = check_base_url(base_url)
        self._api_origin = _origin(self.base_url)
        self._key = api_key
        self.timeouts = timeouts or Timeouts()
        self.max_download_bytes = max_download_bytes
        self.upload_flow = upload_flow
        self.stats = ClientStats()
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._identity = {
            "User-Agent": f"wsbatch/{__version__}",
            "X-Client-Name": "wsbatch",
            "X-Client-Version": __version__,
            "X-Client-OS": f"{platform.system()}/{platform.release()}".lower(),
        }

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._connections, ttl_dns_cache=300, keepalive_timeout=30
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": self._identity["User-Agent"]},
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect),
                raise_for_status=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("client is not open")
        return self._session

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # -- API origin --------------------------------------------------------

    async def _api(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        read_timeout: float,
        max_bytes: int = MAX_JSON_BYTES,
        what: str,
        data: Any = None,
    ) -> Any:
        """One request to the API origin; returns ``data`` of the envelope."""
        url = self.base_url + path
        headers = {**self._identity, "Authorization": f"Bearer {self._key}"}
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeouts.connect, sock_read=read_timeout
        )
        self.stats.requests += 1
        try:
            async with self.session.request(
                method,
                url,
                data=json.dumps(json_body) if json_body is not None else data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                body = await self._read_capped(resp, max_bytes, what)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (ApiError, AuthError):
            raise
        except Exception as exc:
            raise self._transport_error(exc, what) from None
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        payload = self._decode(body)
        if 300 <= status < 400:
            raise ApiError(
                f"{what}: unexpected redirect (HTTP {status}); not following it with the key",
                status=status,
                retryable=False,
            )
        envelope_code = payload.get("code") if isinstance(payload, dict) else None
        if status != 200 or (isinstance(envelope_code, int) and envelope_code != 200):
            effective = status if status != 200 else int(envelope_code or status)
            raise self._http_error(effective, payload, retry_after, what)
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            raise ApiError(f"{what}: answer has no data object", status=status, retryable=True)
        return payload["data"]

    async def _read_capped(self, resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
        length = resp.content_length
        if length is not None and length > cap:
            raise OutputError(f"{what}: answer of {length} bytes is over the {cap} byte limit")
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > cap:
                raise OutputError(f"{what}: answer is over the {cap} byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _decode(body: bytes) -> Any:
        if not body:
            return {}
        try:
            return json.loads(body)
        except ValueError:
            return {"message": body[:200].decode(errors="replace")}

    def _transport_error(self, exc: BaseException, what: str) -> ApiError:
        if isinstance(exc, aiohttp.ClientConnectorError):
            # Refused before anything was sent: a submit created nothing.
            return ApiError(f"{what}: cannot connect ({self._scrub(str(exc))})", retryable=True)
        if isinstance(exc, TimeoutError):
            return ApiError(f"{what}: no answer in time", retryable=True, outcome_unknown=True)
        if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            return ApiError(
                f"{what}: connection dropped before the answer",
                retryable=True,
                outcome_unknown=True,
            )
        name = type(exc).__name__
        return ApiError(
            f"{what}: {name}: {self._scrub(str(exc))[:200]}", retryable=True, outcome_unknown=True
        )

    def _http_error(
        self, status: int, payload: Any, retry_after: str | None, what: str
    ) -> ApiError | AuthError:
        message = ""
        code: int | None = None
        if isinstance(payload, dict):
            message = str(payload.get("message") or payload.get("error") or "")
            raw_code = payload.get("error_code", payload.get("code"))
            code = raw_code if isinstance(raw_code, int) else None
        message = self._scrub(message)[:300]
        detail = f" ({message})" if message else ""
        if status == 401:
            return AuthError(
                f"the API refused the key (HTTP 401){detail}. Check WAVESPEED_API_KEY or "
                "--api-key-file; a new key works only after the account's first top-up."
            )
        if status == 403:
            return AuthError(
                f"the API denied access (HTTP 403){detail}. The account may be suspended "
                "or the key may lack permission for this model."
            )
        if status == 402 or (status in (400, 403) and CREDIT_WORDS.search(message)):
            return AuthError(f"the account cannot pay for tasks (HTTP {status}){detail}. Top up.")
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

    # -- operations --------------------------------------------------------

    async def submit(self, model: str, payload: Mapping[str, Any]) -> str:
        """Create a task; return its prediction id."""
        self.stats.submits += 1
        data = await self._api(
            "POST",
            f"/api/v3/{model}",
            json_body=dict(payload),
            read_timeout=self.timeouts.submit,
            what="submit",
        )
        prediction_id = data.get("id")
        if not isinstance(prediction_id, str) or not prediction_id:
            # The task may exist, but without its id we cannot follow it.
            raise ApiError(
                "submit: answer carries no prediction id", retryable=True, outcome_unknown=True
            )
        return prediction_id

    async def result(self, prediction_id: str) -> Prediction:
        """Poll a task once."""
        self.stats.polls += 1
        try:
            data = await self._api(
                "GET",
                f"/api/v3/predictions/{prediction_id}/result",
                read_timeout=self.timeouts.poll,
                max_bytes=self.max_download_bytes * 2 + MAX_JSON_BYTES,
                what="poll",
            )
        except ApiError as exc:
            if exc.status == 404:
                raise PredictionGone(prediction_id) from None
            raise
        return self._prediction(prediction_id, data)

    def _prediction(self, prediction_id: str, data: Mapping[str, Any]) -> Prediction:
        status = str(data.get("status") or "").lower()
        raw_code = data.get("code")
        code = raw_code if isinstance(raw_code, int) and raw_code != 200 else None
        error = data.get("error")
        timings = data.get("timings")
        inference = timings.get("inference") if isinstance(timings, dict) else None
        outputs = data.get("outputs") or []
        nsfw = data.get("has_nsfw_contents") or []
        prediction = Prediction(
            id=str(data.get("id") or prediction_id),
            status=status,
            outputs=tuple(str(o) for o in outputs if isinstance(o, str)),
            nsfw=tuple(bool(n) for n in nsfw) if isinstance(nsfw, list) else (),
            error=self._scrub(str(error))[:500] if error else None,
            code=code,
            inference_ms=int(inference) if isinstance(inference, int | float) else None,
        )
        if status in GONE_STATUSES:
            raise PredictionGone(prediction_id)
        if status in FAILED_STATUSES:
            raise TaskFailed(status, prediction.error or f"task {status}", code)
        if status == "completed" and not prediction.outputs:
            raise TaskFailed(status, "task completed without outputs", code)
        return prediction

    async def fetch_output(self, value: str, expected_format: str) -> bytes:
        """Bytes of one output: a URL to download, or base64 (bare or a data: URI)."""
        if value.startswith("data:"):
            data = _parse_data_uri(value)
        elif value.startswith(("http://", "https://")):
            data = await self._download(value)
        else:
            data = _b64(value)
        if len(data) > self.max_download_bytes:
            raise OutputError("output is over the download size limit", retryable=False)
        found = sniff_image(data[:16])
        if found != expected_format:
            what = f"a {found} image" if found else "not an image"
            raise OutputError(f"output is {what}, expected {expected_format}")
        return data

    async def _download(self, url: str) -> bytes:
        # A CDN may redirect (to storage); follow a few hops ourselves, so that the key
        # can never ride along and a redirect loop ends.
        for _ in range(MAX_REDIRECTS + 1):
            data, location = await self._download_once(url)
            if location is None:
                assert data is not None
                self.stats.bytes_downloaded += len(data)
                return data
            target = urljoin(url, location)
            if _origin(target) == self._api_origin or not target.startswith(
                ("http://", "https://")
            ):
                raise OutputError("download: refusing a redirect back to the API origin")
            url = target
        raise OutputError(f"download: more than {MAX_REDIRECTS} redirects")

    async def _download_once(self, url: str) -> tuple[bytes | None, str | None]:
        """The body, or the Location of a redirect to follow."""
        # Outputs live on a CDN: never send the key there, nor anywhere but the API.
        if _origin(url) == self._api_origin:
            headers = {"Authorization": f"Bearer {self._key}"}
        else:
            headers = {}
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeouts.connect, sock_read=self.timeouts.download
        )
        self.stats.downloads += 1
        try:
            async with self.session.get(
                url, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                if resp.status in (301, 302, 303, 307, 308) and not headers:
                    return None, resp.headers.get("Location", "")
                if resp.status >= 500 or resp.status in (408, 429):
                    raise ApiError(
                        f"download: HTTP {resp.status}",
                        status=resp.status,
                        retryable=True,
                        retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                    )
                if resp.status != 200:
                    raise OutputError(f"download: HTTP {resp.status}")
                data = await self._read_capped(resp, self.max_download_bytes, "download")
                if resp.content_length is not None and len(data) != resp.content_length:
                    raise OutputError("download: truncated")
        except (OutputError, ApiError):
            raise
        except aiohttp.ClientPayloadError:
            raise OutputError("download: truncated") from None
        except Exception as exc:
            raise self._transport_error(exc, "download") from None
        return data, None

    async def upload(self, path: Path, data: bytes) -> str:
        """Upload a local image; return the URL to pass as ``image``."""
        self.stats.uploads += 1
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if self.upload_flow in ("auto", "ticket"):
            try:
                return await self._upload_ticket(path.name, data, content_type)
            except ApiError as exc:
                if self.upload_flow == "ticket" or exc.status not in (404, 405):
                    raise
        return await self._upload_binary(path.name, data, content_type)

    async def _upload_ticket(self, filename: str, data: bytes, content_type: str) -> str:
        ticket = await self._api(
            "POST",
            "/api/v3/media/uploads",
            json_body={"filename": filename, "size": len(data), "content_type": content_type},
            read_timeout=self.timeouts.submit,
            what="upload",
        )
        upload = ticket.get("upload")
        download_url = ticket.get("download_url")
        if not isinstance(upload, dict) or not isinstance(download_url, str):
            raise ApiError("upload: ticket lacks upload or download_url", retryable=False)
        put_url = str(upload.get("url") or "")
        method = str(upload.get("method") or "PUT").upper()
        put_headers = {str(k): str(v) for k, v in (upload.get("headers") or {}).items()}
        if not put_url.startswith(("http://", "https://")):
            raise ApiError("upload: ticket has no upload URL", retryable=False)
        # The upload URL is pre-signed storage: exactly its headers, never the key.
        put_headers.pop("Authorization", None)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeouts.connect, sock_read=self.timeouts.upload
        )
        try:
            async with self.session.request(
                method,
                put_url,
                data=data,
                headers=put_headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise ApiError(
                        f"upload: storage answered HTTP {resp.status}",
                        status=resp.status,
                        retryable=resp.status >= 500 or resp.status in (408, 429),
                    )
        except ApiError:
            raise
        except Exception as exc:
            raise self._transport_error(exc, "upload") from None
        return download_url

    async def _upload_binary(self, filename: str, data: bytes, content_type: str) -> str:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=filename, content_type=content_type)
        result = await self._api(
            "POST",
            "/api/v3/media/upload/binary",
            data=form,
            read_timeout=self.timeouts.upload,
            what="upload",
        )
        url = result.get("download_url")
        if not isinstance(url, str) or not url:
            raise ApiError("upload: answer has no download_url", retryable=False)
        return url

    async def find_prediction(
        self, model: str, payload: Mapping[str, Any], since: float
    ) -> str | None:
        """Find a task a lost submit created, by matching its inputs; None when unsure.

        Used only after a submit whose answer was lost; works only where the
        listing carries each task's inputs.
        """
        after = datetime.fromtimestamp(since - 120, UTC).isoformat().replace("+00:00", "Z")
        try:
            data = await self._api(
                "POST",
                "/api/v3/predictions",
                json_body={"page": 1, "page_size": 100, "model": model, "created_after": after},
                read_timeout=self.timeouts.poll,
                what="reconcile",
            )
        except ApiError:
            return None
        items = data.get("items")
        if not isinstance(items, list):
            return None
        keys = ("prompt", "image", "seed")
        matches = []
        for item in items:
            if not isinstance(item, dict):
                continue
            inputs = item.get("input") or item.get("inputs")
            if not isinstance(inputs, dict):
                return None  # the listing does not carry inputs: nothing can be matched
            if all(inputs.get(k) == payload.get(k) for k in keys) and isinstance(
                item.get("id"), str
            ):
                matches.append(item["id"])
        # Several matches mean several live copies already; adopt none of them blindly.
        return matches[0] if len(matches) == 1 else None

    async def price(self, model: str, inputs: Mapping[str, Any]) -> float | None:
        try:
            data = await self._api(
                "POST",
                "/api/v3/model/price",
                json_body={"model_id": model, "inputs": dict(inputs)},
                read_timeout=self.timeouts.poll,
                what="price",
            )
        except ApiError:
            return None
        for key in ("unit_price", "price"):
            value = data.get(key)
            if isinstance(value, int | float) and value >= 0:
                return float(value)
        return None
