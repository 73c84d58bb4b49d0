"""The WaveSpeed v3 calls a batch needs: upload, submit, poll, list, billings, price,
balance.

Each call is one request (two for an upload ticket) through the transport; every
failure leaves as a classified error (``ApiError`` with ``retryable`` and
``outcome_unknown``, ``AuthError``, ``PredictionGone``, ``TaskFailed``). Nothing
here sleeps or retries.
"""

from __future__ import annotations

import math
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from batch.errors import ApiError, OutputError, PredictionGone, TaskFailed
from batch.fetch import DEFAULT_MAX_DOWNLOAD, OutputFetcher
from batch.metrics import Metrics
from batch.transport import MAX_JSON_BYTES, Timeouts, Transport, transport_error
from batch.urls import DEFAULT_BASE_URL, check_base_url

__all__ = [
    "DEFAULT_BASE_URL",
    "Billed",
    "Client",
    "Listed",
    "Listing",
    "Prediction",
    "Timeouts",
    "check_base_url",
]

FAILED_STATUSES = frozenset({"failed", "cancelled", "canceled", "timeout"})
GONE_STATUSES = frozenset({"deleted"})


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


@dataclass(frozen=True, slots=True)
class Listed:
    """One prediction from the account's listing; ``inputs`` only where the service
    sends them (its documented items do not)."""

    id: str
    model: str | None
    created_at: str | None
    inputs: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Listing:
    items: tuple[Listed, ...]
    complete: bool  # every page was read


@dataclass(frozen=True, slots=True)
class Billed:
    """One charge from the account's billing records."""

    prediction_id: str
    amount: float
    status: str | None
    refunded: bool
    model: str | None


MAX_LIST_PAGES = 50
PAGE_SIZE = 100


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")


def _amount(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _listed(item: Any) -> Listed | None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
        return None
    # The documented items carry no inputs; the vendor's own CLI reads either name.
    inputs = item.get("input", item.get("inputs"))
    return Listed(
        id=item["id"],
        model=_text(item.get("model")),
        created_at=_text(item.get("created_at")),
        inputs=inputs if isinstance(inputs, dict) else None,
    )


def _billed(item: Any) -> Billed | None:
    if not isinstance(item, dict):
        return None
    pid = item.get("prediction_id", item.get("prediction_uuid"))
    amount = _amount(item.get("amount"))
    if not isinstance(pid, str) or not pid or amount is None:
        return None
    return Billed(
        prediction_id=pid,
        amount=amount,
        status=_text(item.get("status")),
        refunded=item.get("refunded") is True,
        model=_text(item.get("model")),
    )


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
        metrics: Metrics | None = None,
    ) -> None:
        self.transport = Transport(
            base_url, api_key, timeouts=timeouts, connections=connections, metrics=metrics
        )
        self.metrics = self.transport.metrics
        self.base_url = self.transport.base_url
        self.timeouts = self.transport.timeouts
        self.upload_flow = upload_flow
        self.outputs = OutputFetcher(self.transport, max_download_bytes)

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        await self.transport.open()

    async def close(self) -> None:
        await self.transport.close()

    # -- tasks -------------------------------------------------------------

    async def submit(self, model: str, payload: Mapping[str, Any]) -> str:
        """Create a task; return its prediction id."""
        self.metrics.submits += 1
        data = await self.transport.api(
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
        self.metrics.polls += 1
        try:
            data = await self.transport.api(
                "GET",
                f"/api/v3/predictions/{prediction_id}/result",
                read_timeout=self.timeouts.poll,
                max_bytes=self.outputs.max_bytes * 2 + MAX_JSON_BYTES,
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
            outputs=tuple(str(o) for o in outputs if isinstance(o, str))
            if isinstance(outputs, list)
            else (),
            nsfw=tuple(bool(n) for n in nsfw) if isinstance(nsfw, list) else (),
            error=self.transport.scrub(str(error))[:500] if error else None,
            code=code,
            inference_ms=int(inference)
            if isinstance(inference, int | float) and not isinstance(inference, bool)
            else None,
        )
        if status in GONE_STATUSES:
            raise PredictionGone(prediction_id)
        if status in FAILED_STATUSES:
            raise TaskFailed(status, prediction.error or f"task {status}", code)
        if status == "completed" and not prediction.outputs:
            raise TaskFailed(status, "task completed without outputs", code)
        return prediction

    async def fetch_output(self, value: str, expected_format: str | None) -> bytes:
        return await self.outputs.fetch(value, expected_format)

    async def list_predictions(
        self, model: str | None, since: float, until: float | None = None
    ) -> Listing:
        """The account's predictions (of ``model``, when given) created between ``since``
        and ``until`` (epoch s), newest first; ``complete`` is False when there were more
        than ``MAX_LIST_PAGES`` pages."""
        body: dict[str, Any] = {"created_after": _iso(since)}
        if until is not None:
            body["created_before"] = _iso(until)
        if model:
            body["model"] = model
        found: list[Listed] = []
        for page in range(1, MAX_LIST_PAGES + 1):
            data = await self.transport.api(
                "POST",
                "/api/v3/predictions",
                json_body={**body, "page": page, "page_size": PAGE_SIZE},
                read_timeout=self.timeouts.poll,
                what="list",
            )
            items = data.get("items")
            items = items if isinstance(items, list) else []
            found += (listed for item in items if (listed := _listed(item)) is not None)
            if len(items) < PAGE_SIZE:
                return Listing(tuple(found), complete=True)
        return Listing(tuple(found), complete=False)

    async def billings(self, since: float, until: float) -> tuple[Billed, ...]:
        """What the account was charged per prediction created in [since, until]."""
        found: list[Billed] = []
        for page in range(1, MAX_LIST_PAGES + 1):
            data = await self.transport.api(
                "POST",
                "/api/v3/billings/search",
                json_body={
                    "created_after": _iso(since),
                    "created_before": _iso(until),
                    "page": page,
                    "page_size": PAGE_SIZE,
                },
                read_timeout=self.timeouts.poll,
                what="billings",
            )
            items = data.get("items")
            items = items if isinstance(items, list) else []
            found += (billed for item in items if (billed := _billed(item)) is not None)
            if len(items) < PAGE_SIZE:
                break
        return tuple(found)

    async def price(self, model: str, inputs: Mapping[str, Any]) -> float | None:
        """One task's live price for these inputs: the current endpoint, then the older
        one; None when neither answers (offline, or an account without them)."""
        for path in ("/api/v3/model/price", "/api/v3/model/pricing"):
            try:
                data = await self.transport.api(
                    "POST",
                    path,
                    json_body={"model_id": model, "inputs": dict(inputs)},
                    read_timeout=self.timeouts.poll,
                    what="price",
                )
            except ApiError as exc:
                if exc.status in (404, 405):
                    continue  # this shape is not served here: try the other
                return None
            # What is charged: the discounted price where the account has a discount.
            for key in ("discounted_price", "price", "unit_price"):
                amount = _amount(data.get(key))
                if amount is not None:
                    return amount
            return None
        return None

    async def models(self) -> list[Any]:
        """The model catalogue (``GET /api/v3/models``): each model with its schema."""
        data: Any = await self.transport.api(
            "GET", "/api/v3/models", read_timeout=self.timeouts.poll, what="models"
        )
        return data if isinstance(data, list) else []

    async def balance(self) -> float | None:
        """The account's credit in USD, or None when it cannot be read."""
        try:
            data = await self.transport.api(
                "GET", "/api/v3/balance", read_timeout=self.timeouts.poll, what="balance"
            )
        except ApiError:
            return None
        return _amount(data.get("balance"))

    # -- uploads -----------------------------------------------------------

    async def upload(self, path: Path, data: bytes) -> str:
        """Upload a local image; return the URL to pass as ``image``."""
        self.metrics.uploads += 1
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if self.upload_flow in ("auto", "ticket"):
            try:
                return await self._upload_ticket(path.name, data, content_type)
            except ApiError as exc:
                if self.upload_flow == "ticket" or exc.status not in (404, 405):
                    raise
        return await self._upload_binary(path.name, data, content_type)

    async def _upload_ticket(self, filename: str, data: bytes, content_type: str) -> str:
        ticket = await self.transport.api(
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
        timeout = self.timeouts.for_request(self.timeouts.upload)
        try:
            async with (
                self.transport.gate,
                self.transport.session.request(
                    method,
                    put_url,
                    data=data,
                    headers=put_headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp,
            ):
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise ApiError(
                        f"upload: storage answered HTTP {resp.status}",
                        status=resp.status,
                        retryable=resp.status >= 500 or resp.status in (408, 429),
                    )
        except (ApiError, OutputError):
            raise
        except Exception as exc:
            raise transport_error(exc, "upload") from None
        return download_url

    async def _upload_binary(self, filename: str, data: bytes, content_type: str) -> str:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=filename, content_type=content_type)
        result = await self.transport.api(
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
