"""Output bytes: a CDN URL to download (without the key), or base64, bare or a data: URI.

Downloads are size-capped and follow a few redirects by hand, each response
closed first, so the key never rides along and a redirect loop ends.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urljoin

import aiohttp

from batch.errors import ApiError, OutputError
from batch.images import sniff_image
from batch.retry import parse_retry_after
from batch.transport import Transport, origin, read_capped, transport_error

DEFAULT_MAX_DOWNLOAD = 64 * 1024 * 1024
MAX_REDIRECTS = 5


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise OutputError("output is neither a URL nor valid base64", retryable=False) from None


def _parse_data_uri(value: str) -> bytes:
    header, _, payload = value.partition(",")
    if ";base64" not in header:
        raise OutputError("data: output is not base64", retryable=False)
    return _b64(payload)


class OutputFetcher:
    def __init__(self, transport: Transport, max_bytes: int = DEFAULT_MAX_DOWNLOAD) -> None:
        self.transport = transport
        self.max_bytes = max_bytes

    async def fetch(self, value: str, expected_format: str | None) -> bytes:
        """Bytes of one output, checked to be an image of the promised format (any image
        format, for a model that chooses its own)."""
        if value.startswith("data:"):
            data = _parse_data_uri(value)
        elif value.startswith(("http://", "https://")):
            data = await self._download(value)
        else:
            data = _b64(value)
        if len(data) > self.max_bytes:
            raise OutputError("output is over the download size limit", retryable=False)
        found = sniff_image(data[:16])
        if found is None or (expected_format is not None and found != expected_format):
            what = f"a {found} image" if found else "not an image"
            raise OutputError(f"output is {what}, expected {expected_format}")
        return data

    async def _download(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            data, location = await self._download_once(url)
            if location is None:
                assert data is not None
                self.transport.metrics.bytes_downloaded += len(data)
                return data
            target = urljoin(url, location)
            if origin(target) == self.transport.api_origin or not target.startswith(
                ("http://", "https://")
            ):
                raise OutputError("download: refusing a redirect back to the API origin")
            url = target
        raise OutputError(f"download: more than {MAX_REDIRECTS} redirects")

    async def _download_once(self, url: str) -> tuple[bytes | None, str | None]:
        """The body, or the Location of a redirect to follow."""
        headers = self.transport.auth_header(url)
        timeouts = self.transport.timeouts
        timeout = timeouts.for_request(timeouts.download)
        self.transport.metrics.downloads += 1
        try:
            async with (
                self.transport.gate,
                self.transport.session.get(
                    url, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp,
            ):
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
                data = await read_capped(resp, self.max_bytes, "download")
                if resp.content_length is not None and len(data) != resp.content_length:
                    raise OutputError("download: truncated")
        except (OutputError, ApiError):
            raise
        except aiohttp.ClientPayloadError:
            raise OutputError("download: truncated") from None
        except Exception as exc:
            raise transport_error(exc, "download") from None
        return data, None
