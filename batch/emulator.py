"""A local, WaveSpeedAI-compatible fake server for tests, demos and benchmarks.

It speaks the v3 API (submit, sync-mode submit, result, both upload flows, balance, price,
prediction list, billings, model catalogue) on one loopback port and serves uploads and
outputs from a second port, because the real service hands out CDN URLs on a different
origin and a client must never send its key there. By default it serves what the vendor
documents, no more (no inputs in the listing, no Retry-After); kinder behaviour is a flag.
Everything that can go wrong against the real service can be injected through
:class:`EmulatorConfig` (mutable at runtime) or scripted per endpoint kind.

This module imports nothing from the rest of ``batch`` so it can run on its own
(``python -m batch.emulator``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import heapq
import hmac
import io
import ipaddress
import math
import os
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy
from PIL import Image, ImageDraw

from batch.schema import check_value, missing_fields, unknown_fields

__all__ = [
    "API_FAULT_KINDS",
    "CDN_FAULT_KINDS",
    "DEFAULT_MODEL",
    "FAULT_KINDS",
    "FAULT_NAMES",
    "MODELS",
    "SYNC_TIMEOUT_MESSAGE",
    "TASK_ERROR_MESSAGES",
    "Emulator",
    "EmulatorConfig",
    "EmulatorStats",
    "ModelSpec",
    "Prediction",
    "RecordedRequest",
    "main",
    "render_edit",
    "serve_in_thread",
    "start_emulator",
]

Base64Style = Literal["bare", "data_uri", "mixed"]
PriceShape = Literal["current", "legacy"]

API_FAULT_KINDS = frozenset({"submit", "result", "upload", "account"})
CDN_FAULT_KINDS = frozenset({"upload_put", "download"})
FAULT_KINDS = API_FAULT_KINDS | CDN_FAULT_KINDS
# "account" (balance, price, prediction list) is left out of the default so that a
# fault-heavy config still lets a client do its preflight; opt in explicitly.
DEFAULT_FAULT_ENDPOINTS = frozenset({"submit", "result", "upload", "upload_put", "download"})

_COMMON_FAULTS = frozenset({"429", "500", "502", "503", "drop", "slow", "401", "403", "404"})
# Submit faults that create (and bill) the task, then answer without a usable id.
_LOST_ANSWER_FAULTS = frozenset({"html_after", "null_after", "accepted_after", "500_after"})
FAULT_NAMES: dict[str, frozenset[str]] = {
    "submit": _COMMON_FAULTS | {"drop_after"} | _LOST_ANSWER_FAULTS,
    "result": _COMMON_FAULTS,
    "upload": _COMMON_FAULTS,
    "account": _COMMON_FAULTS,
    "upload_put": _COMMON_FAULTS,
    "download": _COMMON_FAULTS | {"truncate", "garbage"},
}

TASK_ERROR_MESSAGES: dict[int, str] = {
    1200: "content flagged by moderation",
    1400: "missing required parameter",
    1401: "invalid parameter",
    1402: "input image could not be fetched",
    1403: "task failed",
    1405: "task failed",
    5000: "internal server error",
    5003: "service temporarily unavailable",
    5004: "task timed out",
}
SYNC_TIMEOUT_MESSAGE = "Sync mode timed out"

_ERROR_MESSAGES: dict[int, str] = {
    400: "Bad request",
    401: "Unauthorized: invalid or inactive API key",
    402: "Insufficient balance: please top up your account",
    403: "Forbidden: account suspended",
    404: "Not found",
    405: "Method not allowed",
    413: "Payload too large",
    429: "Rate limit exceeded",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}

_FORMATS: dict[str, tuple[str, str]] = {
    # output_format -> (Pillow format, MIME type)
    "jpeg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
    "webp": ("WEBP", "image/webp"),
}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    # Fixed encoder settings keep outputs byte-for-byte reproducible.
    "jpeg": {"quality": 90, "optimize": False, "progressive": False},
    "png": {"compress_level": 6},
    "webp": {"quality": 85, "method": 4},
}
_SEED_MAX = 2_147_483_647
_MODEL_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED_PREFIXES = ("predictions/", "media/", "model/", "billings/")
# GET endpoints: a POST there is a wrong method, never a submit to a model of that name.
_GET_ONLY = frozenset({"balance", "models"})
_MAX_FETCH_BYTES = 64 * 1024 * 1024
_GARBAGE = b"<html><body>502 Bad Gateway (emulated garbage payload)</body></html>\n"
_HTML_ANSWER = (
    "<!DOCTYPE html><html><head><title>WaveSpeedAI</title></head>"
    "<body><p>Request received.</p></body></html>\n"
)
_READ_CHUNK = 256 * 1024
_LISTING_FIELDS = (
    "id",
    "model",
    "outputs",
    "urls",
    "has_nsfw_contents",
    "status",
    "created_at",
    "error",
    "executionTime",
    "timings",
)
DEFAULT_MODEL = "wavespeed-ai/hidream-e1-full"


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry; ``request_schema`` is the JSON schema ``GET /models`` serves."""

    model_id: str
    name: str
    description: str
    type: str
    request_schema: dict[str, Any]


def _seed_schema() -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": -1,
        "maximum": _SEED_MAX,
        "default": -1,
        "description": "Random seed; -1 picks one at random.",
    }


def _flag_schema(description: str) -> dict[str, Any]:
    return {"type": "boolean", "default": False, "description": description}


_BASE64_DOC = "Return outputs as base64 instead of URLs."
_SYNC_DOC = "Hold the submit until the task is done and answer its result."


def _one_image_schema() -> dict[str, Any]:
    """The request schema of an editor of one input image (HiDream, Qwen)."""
    return {
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "description": "The edit."},
            "image": {"type": "string", "format": "uri", "description": "Input image."},
            "seed": _seed_schema(),
            "output_format": {
                "type": "string",
                "enum": list(_FORMATS),
                "default": "jpeg",
            },
            "enable_base64_output": _flag_schema(_BASE64_DOC),
            "enable_sync_mode": _flag_schema(_SYNC_DOC),
        },
        "required": ["prompt", "image"],
    }


MODELS: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec(
            model_id=DEFAULT_MODEL,
            name="HiDream-E1-Full",
            description="Instruction-based image editing of one input image.",
            type="image-to-image",
            request_schema={
                **_one_image_schema(),
                "x-order-properties": [
                    "prompt",
                    "image",
                    "seed",
                    "output_format",
                    "enable_base64_output",
                    "enable_sync_mode",
                ],
            },
        ),
        ModelSpec(
            model_id="bytedance/seedream-v4/edit",
            name="Seedream V4 Edit",
            description="Multi-image editing: 1 to 10 reference images and a prompt.",
            type="image-to-image",
            request_schema={
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "minLength": 1, "description": "The edit."},
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "uri"},
                        "minItems": 1,
                        "maxItems": 10,
                        "description": "Input images.",
                    },
                    "size": {
                        "type": "string",
                        "pattern": "^[0-9]+\\*[0-9]+$",
                        "default": "2048*2048",
                        "description": "Output size as WIDTH*HEIGHT.",
                    },
                    "seed": _seed_schema(),
                    "enable_base64_output": _flag_schema(_BASE64_DOC),
                    "enable_sync_mode": _flag_schema(_SYNC_DOC),
                },
                "required": ["prompt", "images"],
                "x-order-properties": [
                    "prompt",
                    "images",
                    "size",
                    "seed",
                    "enable_base64_output",
                    "enable_sync_mode",
                ],
            },
        ),
        ModelSpec(
            model_id="google/nano-banana/edit",
            name="Nano Banana Edit",
            description="Gemini 2.5 Flash Image editing: a prompt and 1 to 10 images.",
            type="image-to-image",
            request_schema={
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "minLength": 1, "description": "The edit."},
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "uri"},
                        "minItems": 1,
                        "maxItems": 10,
                        "description": "Input images.",
                    },
                    "output_format": {
                        "type": "string",
                        "enum": ["png", "jpeg"],
                        "default": "png",
                    },
                    "enable_base64_output": _flag_schema(_BASE64_DOC),
                    "enable_sync_mode": _flag_schema(_SYNC_DOC),
                },
                "required": ["prompt", "images"],
            },
        ),
        ModelSpec(
            model_id="wavespeed-ai/qwen-image/edit",
            name="Qwen Image Edit",
            description="Instruction-based editing of one input image.",
            type="image-to-image",
            request_schema=_one_image_schema(),
        ),
    )
}


@dataclass
class EmulatorConfig:
    """Behaviour knobs. Mutate fields at runtime; every request reads them afresh.

    Defaults are what the vendor documents; anything kinder (listing inputs,
    Retry-After) is opt-in so a client cannot come to depend on it by accident.
    """

    api_key: str | None = None
    # Task run time: uniform in (lo, hi), or lognormal (median seconds, sigma) when set.
    latency: tuple[float, float] = (0.0, 0.0)
    latency_lognormal: tuple[float, float] | None = None
    # Tasks beyond the cap queue ("created") until a slot frees.
    max_concurrent: int | None = None
    # Sliding 60 s window of accepted generations.
    rate_per_minute: int | None = None
    # Fixed windows of rate_window seconds, aligned to the emulator's start, as the vendor's.
    rate_limit: int | None = None
    rate_window: float = 60.0
    # No Retry-After is documented for 429; when sent, scripted/random 429s use retry_after.
    send_retry_after: bool = False
    retry_after: int | None = 1
    base64_style: Base64Style = "bare"
    outputs_per_task: int = 1
    balance: float = 100.0
    # Price of one task for models not in model_prices.
    price: float = 0.024
    model_prices: dict[str, float] = field(
        # Seedream's is the documented price; the other two are illustrative.
        default_factory=lambda: {
            "bytedance/seedream-v4/edit": 0.027,
            "google/nano-banana/edit": 0.038,
            "wavespeed-ai/qwen-image/edit": 0.025,
        }
    )
    price_shape: PriceShape = "current"
    enforce_balance: bool = False
    # A failed task's charge comes back this many seconds after it failed.
    refund_delay: float = 0.0
    listing_inputs: bool = False
    # A result poll of a younger prediction answers 404 (the vendor's store may lag).
    visibility_delay: float = 0.0
    sync_timeout: float = 90.0
    # Every Nth completed output is flagged in has_nsfw_contents (0 = never).
    nsfw_every: int = 0
    suspended: bool = False
    status_5004_while_processing: bool = False
    max_upload_bytes: int = 200 * 1024 * 1024
    response_delay: float = 0.0
    seed: int | None = None
    p_429: float = 0.0
    p_5xx: float = 0.0
    p_drop: float = 0.0
    p_fail_task: float = 0.0
    fail_codes: list[int] = field(default_factory=lambda: [1200, 1401, 5000])
    fault_endpoints: set[str] = field(default_factory=lambda: set(DEFAULT_FAULT_ENDPOINTS))
    known_models: set[str] | None = None
    record_requests: bool = True


@dataclass(frozen=True)
class RecordedRequest:
    origin: Literal["api", "cdn"]
    method: str
    path: str
    headers: CIMultiDictProxy[str]  # case-insensitive, as received
    time: float
    query: str = ""


@dataclass
class EmulatorStats:
    # Every created (and billed) task counts here, whatever its answer was.
    submits_accepted: int = 0
    submits_rejected: int = 0
    # "drop_after": created, then the connection closed without an answer.
    submits_created_then_dropped: int = 0
    # html_after / null_after / accepted_after / 500_after: created, answered without an id.
    submits_created_unanswered: int = 0
    submits_dropped_before: int = 0
    # Ids of every created (billed) task, in creation order; len() == submits_accepted.
    created_ids: list[str] = field(default_factory=list)
    refunded_ids: list[str] = field(default_factory=list)
    sync_submits: int = 0
    sync_timeouts: int = 0
    # Result polls answered 404 because the task was younger than visibility_delay.
    invisible_polls: int = 0
    nsfw_outputs: int = 0
    rate_limited: int = 0
    upload_tickets: int = 0
    uploads: int = 0
    polls: int = 0
    polls_by_id: dict[str, int] = field(default_factory=dict)
    # When each task was polled (monotonic s), to check a client's spacing.
    poll_monos_by_id: dict[str, list[float]] = field(default_factory=dict)
    downloads: int = 0
    input_downloads: int = 0
    # Keyed "<endpoint kind>:<fault name>", e.g. "submit:429".
    faults: dict[str, int] = field(default_factory=dict)
    failed_tasks: list[tuple[str, int]] = field(default_factory=list)
    key_leaks: int = 0
    auth_failures: int = 0

    def fault_count(self, fault: str | None = None, kind: str | None = None) -> int:
        total = 0
        for key, n in self.faults.items():
            k, _, f = key.partition(":")
            if (fault is None or f == fault) and (kind is None or k == kind):
                total += n
        return total


@dataclass
class Prediction:
    id: str
    model: str
    body: dict[str, Any]
    prompt: str
    image: str
    seed: int
    output_format: str
    base64_style: Literal["bare", "data_uri"] | None
    outputs_per_task: int
    created_mono: float
    created_wall: float
    start_mono: float
    finish_mono: float
    finish_wall: float
    price: float = 0.0
    sync: bool = False
    fail_code: int | None = None
    fail_message: str = ""
    deleted: bool = False
    refunded_wall: float | None = None
    nsfw: list[bool] = field(default_factory=list)
    first_completed_poll_mono: float | None = None
    first_completed_poll_wall: float | None = None
    outputs: list[bytes] | None = None
    output_names: list[str] = field(default_factory=list)
    _generation: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)

    def clock_status(self, now: float) -> str:
        """Status by the clock alone; generation can still turn "completed" into "failed"."""
        if now < self.start_mono:
            return "created"
        if now < self.finish_mono:
            return "processing"
        return "failed" if self.fail_code is not None else "completed"

    @property
    def inference_ms(self) -> int:
        return round((self.finish_mono - self.start_mono) * 1000)


@dataclass
class _UploadTicket:
    token: str
    filename: str
    size: int
    content_type: str
    secret: str


@dataclass
class _StoredFile:
    filename: str
    data: bytes
    content_type: str


class _Reply(Exception):
    """Short-circuits a handler with a finished response."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


class _Drop(Exception):
    """Close the connection without (finishing) an answer."""

    def __init__(self, response: web.StreamResponse | None = None) -> None:
        super().__init__()
        self.response = response


def _error(
    status: int, message: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    text = message if message is not None else _ERROR_MESSAGES.get(status, "Error")
    return web.json_response(
        {"code": status, "message": text, "data": None}, status=status, headers=headers
    )


def _ok(data: Any) -> web.Response:
    return web.json_response({"code": 200, "message": "success", "data": data})


def _lost_answer(fault: str) -> web.Response:
    """A submit answer that carries no prediction id (the task may exist all the same)."""
    if fault == "html_after":
        return web.Response(status=200, text=_HTML_ANSWER, content_type="text/html")
    if fault == "null_after":
        return _ok(None)
    if fault == "accepted_after":
        return web.Response(status=202)
    return _error(500)


async def _read_whole(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """Read a body to its end, or None once it exceeds ``limit`` bytes.

    ``StreamReader.read(n)`` answers whatever is buffered (up to n), not n bytes, so a
    single call truncates any body that arrives in more than one TCP segment.
    """
    chunks: list[bytes] = []
    total = 0
    while chunk := await stream.read(_READ_CHUNK):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _iso(wall: float) -> str:
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _sniff_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def _safe_filename(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned[:128] or "file"


def _mime_base(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


_decoded_lock = threading.Lock()
_decoded: OrderedDict[bytes, Image.Image] = OrderedDict()
_DECODED_MAX_ENTRIES = 16
_DECODED_MAX_PIXELS = 4_000_000


def _decode_rgb(src: bytes) -> Image.Image:
    """Decode ``src`` to RGB, reusing recent results: batches often edit one image many times.

    Callers must treat the result as read-only; it may be shared between threads.
    """
    key = hashlib.sha256(src).digest()
    with _decoded_lock:
        cached = _decoded.get(key)
        if cached is not None:
            _decoded.move_to_end(key)
            return cached
    with Image.open(io.BytesIO(src)) as opened:
        opened.load()
        img = opened.convert("RGB")
    if img.width * img.height <= _DECODED_MAX_PIXELS:
        with _decoded_lock:
            _decoded[key] = img
            while len(_decoded) > _DECODED_MAX_ENTRIES:
                _decoded.popitem(last=False)
    return img


def render_edit(src: bytes, prompt: str, seed: int, output_format: str, variant: int = 0) -> bytes:
    """The fake "edit": a visible change to ``src`` derived only from its arguments.

    Raises ``PIL.UnidentifiedImageError`` / ``OSError`` when ``src`` is not an image.
    """
    if output_format not in _FORMATS:
        raise ValueError(f"unsupported output format {output_format!r}")
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{variant}".encode()).digest()
    source = _decode_rgb(src)
    order = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)][digest[0] % 6]
    # One colour-matrix pass does both the channel shuffle and a 30 % tint: it is several
    # times cheaper than split/merge/blend, which matters under benchmark load.
    matrix: list[float] = []
    for channel in range(3):
        row = [0.0, 0.0, 0.0, 0.3 * digest[1 + channel]]
        row[order[channel]] = 0.7
        matrix.extend(row)
    img = source.convert("RGB", tuple(matrix))
    width, height = img.size
    draw = ImageDraw.Draw(img)
    # A solid band guarantees the output differs from the input even for flat images.
    band_h = max(1, height // 6)
    y0 = int.from_bytes(digest[4:6], "big") % max(1, height - band_h + 1)
    draw.rectangle((0, y0, width - 1, y0 + band_h - 1), fill=(digest[6], digest[7], digest[8]))
    side = max(1, min(width, height) // 4)
    x1 = int.from_bytes(digest[9:11], "big") % max(1, width - side + 1)
    y1 = int.from_bytes(digest[11:13], "big") % max(1, height - side + 1)
    draw.ellipse(
        (x1, y1, x1 + side - 1, y1 + side - 1),
        fill=(255 - digest[6], 255 - digest[7], 255 - digest[8]),
    )
    out = io.BytesIO()
    img.save(out, format=_FORMATS[output_format][0], **_SAVE_OPTIONS[output_format])
    return out.getvalue()


def _render_all(src: bytes, prompt: str, seed: int, output_format: str, n: int) -> list[bytes]:
    return [render_edit(src, prompt, seed, output_format, variant=i) for i in range(n)]


class Emulator:
    """A running emulator: two aiohttp sites plus the state tests inspect."""

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1") -> None:
        if not _is_loopback(host):
            raise ValueError(f"the emulator only listens on loopback, not {host!r}")
        self.config = config if config is not None else EmulatorConfig()
        self.host = host
        self.base_url = ""
        self.cdn_url = ""
        self.port = 0
        self.cdn_port = 0
        self.requests: list[RecordedRequest] = []
        self.stats = EmulatorStats()
        self.predictions: dict[str, Prediction] = {}
        # Tracebacks of unexpected handler exceptions; they are answered 500 quietly.
        self.errors: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random(self.config.seed)
        self._scripted: dict[str, deque[str]] = {kind: deque() for kind in FAULT_KINDS}
        self._forced_failures: deque[tuple[int, str]] = deque()
        self._slots: list[float] = []
        self._slot_count: int | None = None
        self._window: deque[float] = deque()
        # Fixed rate windows are numbered from here; start() resets it.
        self.started_mono = time.monotonic()
        self._fixed_window: tuple[float, int] = (0.0, -1)
        self._fixed_count = 0
        # Created tasks whose charge may still be refunded, oldest first.
        self._unsettled: dict[str, Prediction] = {}
        self._outputs_made = 0
        self._b64_counter = 0
        self._tickets: dict[str, _UploadTicket] = {}
        self._uploads: dict[str, _StoredFile] = {}
        self._outputs: dict[str, _StoredFile] = {}
        self._generations: set[asyncio.Future[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []

    # ----------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0, cdn_port: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        self.started_mono = time.monotonic()
        api_app = web.Application(middlewares=[self._api_middleware], client_max_size=64 * 2**20)
        api_app.router.add_get("/api/v3/balance", self._handle_balance)
        api_app.router.add_get("/api/v3/models", self._handle_models)
        api_app.router.add_get("/api/v3/predictions/{id}/result", self._handle_result)
        api_app.router.add_post("/api/v3/{tail:.+}", self._handle_post)
        api_app.router.add_get("/_emulator/state", self._handle_state)
        cdn_app = web.Application(middlewares=[self._cdn_middleware])
        cdn_app.router.add_get("/inputs/{token}/{filename}", self._handle_input_get)
        cdn_app.router.add_get("/outputs/{name}", self._handle_output_get)
        cdn_app.router.add_put("/upload/{token}", self._handle_upload_put)
        try:
            self.port = await self._serve(api_app, port)
            self.cdn_port = await self._serve(cdn_app, cdn_port)
        except BaseException:
            await self.close()
            raise
        host = _url_host(self.host)
        self.base_url = f"http://{host}:{self.port}"
        self.cdn_url = f"http://{host}:{self.cdn_port}"

    async def _serve(self, app: web.Application, port: int) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, port), family=family)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        self._runners.append(runner)
        try:
            await runner.setup()
            # A large backlog: benchmarks open hundreds of connections at once.
            site = web.SockSite(runner, sock, backlog=1024)
            await site.start()
        except BaseException:
            sock.close()
            raise
        bound: int = sock.getsockname()[1]
        return bound

    async def close(self) -> None:
        for fut in list(self._generations):
            fut.cancel()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ test controls

    def script(self, kind: str, *faults: str) -> None:
        """Queue exact faults for the next requests of ``kind``, consumed in order."""
        if kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown endpoint kind {kind!r}; expected one of {sorted(FAULT_KINDS)}"
            )
        for fault in faults:
            if fault not in FAULT_NAMES[kind]:
                raise ValueError(f"fault {fault!r} is not valid for {kind!r}")
        self._scripted[kind].extend(faults)

    def pending_faults(self, kind: str) -> list[str]:
        return list(self._scripted[kind])

    def fail_next_tasks(self, code: int, message: str, n: int = 1) -> None:
        """Force the next ``n`` accepted submits to end ``failed`` with ``code``."""
        for _ in range(n):
            self._forced_failures.append((code, message))

    def delete_prediction(self, prediction_id: str) -> bool:
        """Forget a prediction as the vendor does after 7 days; its result answers 404."""
        pred = self.predictions.get(prediction_id)
        if pred is None or pred.deleted:
            return False
        pred.deleted = True
        for name in pred.output_names:
            self._outputs.pop(name, None)
        return True

    def output_bytes(self, prediction_id: str) -> list[bytes]:
        """Exact image bytes served (or base64-encoded) for a prediction; [] if none yet."""
        pred = self.predictions.get(prediction_id)
        if pred is None or pred.outputs is None:
            return []
        return list(pred.outputs)

    def uploaded_bytes(self, download_url: str) -> bytes | None:
        token = self._local_token(download_url, "inputs")
        stored = self._uploads.get(token) if token else None
        return stored.data if stored else None

    def reset_stats(self) -> None:
        """Zero the counters and forget recorded requests (predictions are kept)."""
        self.stats = EmulatorStats()
        self.requests = []

    # ----------------------------------------------------------- middlewares

    def _record(self, origin: Literal["api", "cdn"], request: web.Request) -> None:
        if self.config.record_requests:
            self.requests.append(
                RecordedRequest(
                    origin=origin,
                    method=request.method,
                    path=request.path,
                    headers=request.headers,
                    time=time.monotonic(),
                    query=request.query_string,
                )
            )

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Reply as reply:
            return reply.response
        except _Drop as drop:
            transport = request.transport
            if transport is not None:
                transport.close()
            # aiohttp's attempt to write this to the closed transport is a
            # ConnectionError it ignores, so the client just sees a disconnect.
            return drop.response if drop.response is not None else web.Response()
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason)
        except Exception:
            self.errors.append(traceback.format_exc())
            return _error(500, "Internal server error (emulator bug)")

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._record("api", request)

        async def gate(req: web.Request) -> web.StreamResponse:
            if self.config.response_delay > 0:
                await asyncio.sleep(self.config.response_delay)
            self._check_auth(req)
            return await handler(req)

        return await self._guarded(request, gate)

    @web.middleware
    async def _cdn_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._record("cdn", request)
        if "Authorization" in request.headers:
            # A CDN or presigned URL never needs the API key; receiving it is a leak.
            self.stats.key_leaks += 1
            return _error(403, "Forbidden: Authorization header not accepted by the CDN")
        return await self._guarded(request, handler)

    def _check_auth(self, request: web.Request) -> None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        expected = self.config.api_key
        valid = scheme.lower() == "bearer" and bool(key)
        if valid and expected:
            valid = hmac.compare_digest(key.encode(), expected.encode())
        if not valid:
            self.stats.auth_failures += 1
            raise _Reply(_error(401))
        if self.config.suspended:
            raise _Reply(_error(403, "Forbidden: account suspended"))

    # -------------------------------------------------------------- faults

    def _draw_fault(self, kind: str) -> str | None:
        queue = self._scripted[kind]
        if queue:
            try:
                return queue.popleft()
            except IndexError:  # emptied by another thread in between
                pass
        cfg = self.config
        if kind not in cfg.fault_endpoints:
            return None
        p_429 = cfg.p_429 if kind in API_FAULT_KINDS else 0.0
        if p_429 <= 0 and cfg.p_5xx <= 0 and cfg.p_drop <= 0:
            return None
        r = self._rng.random()
        if r < p_429:
            return "429"
        if r < p_429 + cfg.p_5xx:
            return self._rng.choice(("500", "502", "503"))
        if r < p_429 + cfg.p_5xx + cfg.p_drop:
            if kind == "submit" and self._rng.random() < 0.5:
                return "drop_after"
            return "drop"
        return None

    async def _inject(self, kind: str) -> str | None:
        """Apply the next fault for ``kind``; returns one the handler must finish itself."""
        fault = self._draw_fault(kind)
        if fault is None:
            return None
        key = f"{kind}:{fault}"
        self.stats.faults[key] = self.stats.faults.get(key, 0) + 1
        if fault == "slow":
            await asyncio.sleep(self.config.response_delay or 5.0)
            return None
        if fault == "drop":
            if kind == "submit":
                self.stats.submits_dropped_before += 1
            raise _Drop()
        if fault == "429":
            headers = self._retry_after_headers(self.config.retry_after)
            raise _Reply(_error(429, headers=headers))
        if fault in ("401", "403", "404", "500", "502", "503"):
            raise _Reply(_error(int(fault)))
        return fault

    def _retry_after_headers(self, seconds: int | None) -> dict[str, str] | None:
        if seconds is None or not self.config.send_retry_after:
            return None
        return {"Retry-After": str(seconds)}

    # ------------------------------------------------------------ API handlers

    async def _handle_post(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        if tail == "predictions":
            return await self._handle_list(request)
        if tail == "media/uploads":
            return await self._handle_upload_ticket(request)
        if tail == "media/upload/binary":
            return await self._handle_upload_binary(request)
        if tail == "billings/search":
            return await self._handle_billings(request)
        # Only one of the two price paths exists at a time, as on the real service.
        price_path = "model/price" if self.config.price_shape == "current" else "model/pricing"
        if tail == price_path:
            return await self._handle_price(request)
        if tail in _GET_ONLY:
            return _error(405)
        if tail.startswith(_RESERVED_PREFIXES):
            return _error(404)
        segments = tail.split("/")
        if not all(_MODEL_SEGMENT.fullmatch(s) for s in segments):
            return _error(404, f"Model not found: {tail}")
        return await self._handle_submit(request, tail)

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise _Reply(_error(400, "Invalid request: body is not valid JSON")) from None
        if not isinstance(body, dict):
            raise _Reply(_error(400, "Invalid request: body must be a JSON object"))
        return body

    async def _handle_submit(self, request: web.Request, model: str) -> web.StreamResponse:
        fault = await self._inject("submit")
        try:
            pred = await self._create_prediction(request, model)
        except _Reply:
            self.stats.submits_rejected += 1
            if fault == "drop_after":
                self.stats.submits_dropped_before += 1
                raise _Drop() from None
            if fault in _LOST_ANSWER_FAULTS:
                # The answer is mangled whatever it was; nothing was created here.
                return _lost_answer(fault)
            raise
        if fault == "drop_after":
            # Created and billed, but the client never learns the id.
            self.stats.submits_created_then_dropped += 1
            raise _Drop()
        if fault in _LOST_ANSWER_FAULTS:
            self.stats.submits_created_unanswered += 1
            return _lost_answer(fault)
        if pred.sync:
            return await self._sync_answer(pred)
        return _ok(self._prediction_data(pred, "created"))

    async def _sync_answer(self, pred: Prediction) -> web.StreamResponse:
        """Hold a sync-mode submit until the task ends or sync_timeout passes."""
        self.stats.sync_submits += 1
        deadline = pred.created_mono + max(0.0, self.config.sync_timeout)
        wait = min(pred.finish_mono, deadline) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        now = time.monotonic()
        if now < pred.finish_mono:
            # The vendor answers 200 "processing" with code 5004; the task goes on.
            self.stats.sync_timeouts += 1
            data = self._prediction_data(pred, "processing")
            data["code"] = 5004
            data["error"] = SYNC_TIMEOUT_MESSAGE
            return _ok(data)
        status = await self._current_status(pred, now)
        if status == "completed" and pred.first_completed_poll_mono is None:
            # The client learns of completion now, as it would from a poll.
            pred.first_completed_poll_mono = now
            pred.first_completed_poll_wall = time.time()
        return _ok(self._prediction_data(pred, status))

    async def _create_prediction(self, request: web.Request, model: str) -> Prediction:
        cfg = self.config
        body = await self._json_object(request)
        spec = MODELS.get(model)
        if (cfg.known_models is not None and model not in cfg.known_models) or (
            cfg.known_models is None and spec is None
        ):
            raise _Reply(_error(404, f"Model not found: {model}"))
        # Extra models a test names take the default model's fields.
        schema = (spec or MODELS[DEFAULT_MODEL]).request_schema
        for name in unknown_fields(body, schema):
            raise _Reply(_error(400, f"Invalid request: unknown field '{name}' for {model}"))
        for name in missing_fields(body, schema):
            raise _Reply(_error(400, f"Invalid request: '{name}' is required"))
        for name, value in body.items():
            why = check_value(name, value, schema["properties"][name])
            if why is not None:
                raise _Reply(_error(400, f"Invalid request: '{name}' {why}"))
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _Reply(_error(400, "Invalid request: 'prompt' is required (non-empty string)"))
        images = body.get("images")
        image = images[0] if isinstance(images, list) and images else body.get("image")
        if not isinstance(image, str) or not image:
            raise _Reply(_error(400, "Invalid request: 'image' is required (an http(s) URL)"))
        seed = body.get("seed", -1)
        fmt = body.get("output_format", "jpeg")
        b64 = body.get("enable_base64_output", False)
        sync = body.get("enable_sync_mode", False)

        # From here to the task's creation nothing awaits, so concurrent submits cannot
        # all pass the rate and balance checks before any of them is counted.
        now = time.monotonic()
        self._check_rate(now)
        price = self._price_of(model)
        if cfg.enforce_balance:
            self._settle_refunds(now)
            if cfg.balance < price:
                raise _Reply(_error(402))

        if seed == -1:
            seed = self._rng.randint(0, _SEED_MAX)
        start, finish = self._schedule(now, self._draw_latency())
        wall = time.time()
        style: Literal["bare", "data_uri"] | None = None
        if b64:
            if cfg.base64_style == "mixed":
                style = "bare" if self._b64_counter % 2 == 0 else "data_uri"
                self._b64_counter += 1
            else:
                style = "data_uri" if cfg.base64_style == "data_uri" else "bare"
        pred = Prediction(
            id=uuid.uuid4().hex,
            model=model,
            body=body,
            prompt=prompt,
            image=image,
            seed=seed,
            output_format=fmt,
            base64_style=style,
            outputs_per_task=max(1, cfg.outputs_per_task),
            created_mono=now,
            created_wall=wall,
            start_mono=start,
            finish_mono=finish,
            finish_wall=wall + (finish - now),
            price=price,
            sync=sync,
        )
        failure = self._choose_failure()
        if failure is not None:
            self._mark_failed(pred, *failure)
        self.predictions[pred.id] = pred
        self._count_generation(now)
        cfg.balance = round(cfg.balance - price, 10)
        self._unsettled[pred.id] = pred
        self.stats.submits_accepted += 1
        self.stats.created_ids.append(pred.id)
        return pred

    def _check_rate(self, now: float) -> None:
        """Refuse with 429 when a sliding or fixed-window limit is used up."""
        cfg = self.config
        wait: float | None = None
        if cfg.rate_per_minute is not None:
            window = self._window
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= cfg.rate_per_minute:
                wait = window[0] + 60.0 - now if window else 60.0
        if wait is None and cfg.rate_limit is not None:
            self._sync_fixed_window(now)
            if self._fixed_count >= cfg.rate_limit:
                length, index = self._fixed_window
                wait = self.started_mono + (index + 1) * length - now
        if wait is not None:
            self.stats.rate_limited += 1
            headers = self._retry_after_headers(max(1, math.ceil(wait)))
            raise _Reply(_error(429, headers=headers))

    def _sync_fixed_window(self, now: float) -> None:
        length = self.config.rate_window if self.config.rate_window > 0 else 60.0
        current = (length, math.floor((now - self.started_mono) / length))
        if current != self._fixed_window:
            # A new window (or a new window length): the limit resets.
            self._fixed_window = current
            self._fixed_count = 0

    def _count_generation(self, now: float) -> None:
        # Counted whether or not a limit is set, so turning one on mid-window is exact.
        if self.config.rate_per_minute is not None:
            self._window.append(now)
        self._sync_fixed_window(now)
        self._fixed_count += 1

    def _draw_latency(self) -> float:
        cfg = self.config
        if cfg.latency_lognormal is not None:
            median, sigma = cfg.latency_lognormal
            if median <= 0:
                return 0.0
            return self._rng.lognormvariate(math.log(median), max(0.0, sigma))
        lo, hi = cfg.latency
        return self._rng.uniform(lo, hi) if hi > lo else max(0.0, lo)

    def _price_of(self, model: str) -> float:
        return self.config.model_prices.get(model, self.config.price)

    def _schedule(self, now: float, latency: float) -> tuple[float, float]:
        cap = self.config.max_concurrent
        if cap is None or cap <= 0:
            self._slot_count = None
            self._slots = []
            return now, now + latency
        if self._slot_count != cap:
            # Resizing keeps the soonest-free slots so a lowered cap still drains FIFO.
            kept = sorted(self._slots)[:cap]
            self._slots = kept + [0.0] * (cap - len(kept))
            heapq.heapify(self._slots)
            self._slot_count = cap
        free_at = heapq.heappop(self._slots)
        start = max(now, free_at)
        finish = start + latency
        heapq.heappush(self._slots, finish)
        return start, finish

    def _choose_failure(self) -> tuple[int, str] | None:
        if self._forced_failures:
            try:
                return self._forced_failures.popleft()
            except IndexError:
                pass
        cfg = self.config
        if cfg.p_fail_task > 0 and cfg.fail_codes and self._rng.random() < cfg.p_fail_task:
            code = self._rng.choice(cfg.fail_codes)
            return code, TASK_ERROR_MESSAGES.get(code, "task failed")
        return None

    def _mark_failed(self, pred: Prediction, code: int, message: str) -> None:
        pred.fail_code = code
        pred.fail_message = message
        self.stats.failed_tasks.append((pred.id, code))

    def _prediction_data(self, pred: Prediction, status: str) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": pred.id,
            "model": pred.model,
            "outputs": [],
            "urls": {"get": f"{self.base_url}/api/v3/predictions/{pred.id}/result"},
            "has_nsfw_contents": [],
            "status": status,
            "created_at": _iso(pred.created_wall),
            "error": "",
            "timings": {"inference": 0},
        }
        if status == "completed" and pred.outputs is not None:
            data["outputs"] = self._render_outputs(pred)
            data["has_nsfw_contents"] = list(pred.nsfw)
            data["timings"] = {"inference": pred.inference_ms}
        elif status == "failed":
            data["error"] = pred.fail_message
            data["code"] = pred.fail_code
        elif status == "processing" and self.config.status_5004_while_processing:
            data["code"] = 5004
        return data

    def _render_outputs(self, pred: Prediction) -> list[str]:
        assert pred.outputs is not None
        if pred.base64_style is None:
            return [f"{self.cdn_url}/outputs/{quote(name)}" for name in pred.output_names]
        encoded = [base64.b64encode(data).decode("ascii") for data in pred.outputs]
        if pred.base64_style == "data_uri":
            mime = _FORMATS[pred.output_format][1]
            return [f"data:{mime};base64,{e}" for e in encoded]
        return encoded

    async def _current_status(self, pred: Prediction, now: float) -> str:
        status = pred.clock_status(now)
        if status == "completed":
            await self._ensure_outputs(pred)
            if pred.fail_code is not None:
                status = "failed"
        return status

    async def _ensure_outputs(self, pred: Prediction) -> None:
        if pred.outputs is not None or pred.fail_code is not None:
            return
        if pred._generation is None:
            fut = asyncio.ensure_future(self._generate(pred))
            self._generations.add(fut)
            fut.add_done_callback(self._generations.discard)
            pred._generation = fut
        # Shielded so a poll whose client went away does not abort the generation.
        await asyncio.shield(pred._generation)

    async def _generate(self, pred: Prediction) -> None:
        src = await self._fetch_input(pred.image)
        if src is None:
            self._mark_failed(pred, 1402, TASK_ERROR_MESSAGES[1402])
            return
        try:
            outputs = await asyncio.to_thread(
                _render_all, src, pred.prompt, pred.seed, pred.output_format, pred.outputs_per_task
            )
        except (OSError, ValueError, Image.DecompressionBombError):
            # Pillow signals "not an image" as OSError (UnidentifiedImageError).
            self._mark_failed(pred, 1402, TASK_ERROR_MESSAGES[1402])
            return
        except Exception:
            self.errors.append(traceback.format_exc())
            self._mark_failed(pred, 5000, TASK_ERROR_MESSAGES[5000])
            return
        mime = _FORMATS[pred.output_format][1]
        names = [f"{pred.id}-{n}.{pred.output_format}" for n in range(len(outputs))]
        pred.nsfw = self._nsfw_flags(pred, len(outputs))
        if pred.base64_style is None and not pred.deleted:
            for name, data in zip(names, outputs, strict=True):
                self._outputs[name] = _StoredFile(name, data, mime)
        pred.output_names = names
        pred.outputs = outputs

    def _nsfw_flags(self, pred: Prediction, n: int) -> list[bool]:
        every = self.config.nsfw_every
        by_prompt = "[nsfw]" in pred.prompt.lower()
        flags: list[bool] = []
        for _ in range(n):
            self._outputs_made += 1
            flags.append(by_prompt or (every > 0 and self._outputs_made % every == 0))
        self.stats.nsfw_outputs += sum(flags)
        return flags

    def _local_token(self, url: str, prefix: str) -> str | None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        if parts.scheme != "http" or port != self.cdn_port:
            return None
        if not _is_loopback(parts.hostname or ""):
            return None
        segments = parts.path.split("/")
        if len(segments) >= 3 and segments[1] == prefix:
            return segments[2]
        return None

    async def _fetch_input(self, url: str) -> bytes | None:
        token = self._local_token(url, "inputs")
        if token is not None:
            stored = self._uploads.get(token)
            return stored.data if stored else None
        name = self._local_token(url, "outputs")
        if name is not None:
            # Chained edits: an earlier output used as the next input.
            out = self._outputs.get(name)
            return out.data if out else None
        if urlsplit(url).scheme not in ("http", "https"):
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return None
                return await _read_whole(resp.content, _MAX_FETCH_BYTES)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def _handle_result(self, request: web.Request) -> web.StreamResponse:
        pid = request.match_info["id"]
        self.stats.polls += 1
        self.stats.polls_by_id[pid] = self.stats.polls_by_id.get(pid, 0) + 1
        self.stats.poll_monos_by_id.setdefault(pid, []).append(time.monotonic())
        await self._inject("result")
        pred = self.predictions.get(pid)
        if pred is None or pred.deleted:
            return _error(404, f"Prediction not found: {pid}")
        now = time.monotonic()
        wall = time.time()
        if not self._visible(pred, now):
            self.stats.invisible_polls += 1
            return _error(404, f"Prediction not found: {pid}")
        status = await self._current_status(pred, now)
        if status == "completed" and pred.first_completed_poll_mono is None:
            pred.first_completed_poll_mono = now
            pred.first_completed_poll_wall = wall
        return _ok(self._prediction_data(pred, status))

    async def _handle_state(self, request: web.Request) -> web.StreamResponse:
        """Counters and task timings, for harnesses that run the emulator in another process."""
        predictions = [
            {
                "id": p.id,
                "model": p.model,
                "status": p.clock_status(time.monotonic()),
                "fail_code": p.fail_code,
                "deleted": p.deleted,
                "created_wall": p.created_wall,
                "start_mono": p.start_mono,
                "finish_mono": p.finish_mono,
                "finish_wall": p.finish_wall,
                "first_completed_poll_mono": p.first_completed_poll_mono,
                "first_completed_poll_wall": p.first_completed_poll_wall,
                "price": p.price,
                "refunded": p.refunded_wall is not None,
            }
            for p in self.predictions.values()
        ]
        return _ok(
            {
                "stats": asdict(self.stats),
                # Every task ever created (billed), also those created before reset_stats.
                "billed": len(self.predictions),
                "predictions": predictions,
            }
        )

    def _visible(self, pred: Prediction, now: float) -> bool:
        return now - pred.created_mono >= self.config.visibility_delay

    def _refund_due(self, pred: Prediction, now: float) -> bool:
        return now >= pred.finish_mono + max(0.0, self.config.refund_delay)

    def _settle_refunds(self, now: float) -> None:
        """Refund known failures whose refund is due; drop tasks whose charge is final."""
        for pid, pred in list(self._unsettled.items()):
            if pred.fail_code is not None:
                if self._refund_due(pred, now):
                    del self._unsettled[pid]
                    pred.refunded_wall = time.time()
                    self.config.balance = round(self.config.balance + pred.price, 10)
                    self.stats.refunded_ids.append(pid)
            elif pred.outputs is not None:
                del self._unsettled[pid]

    async def _settle_account(self) -> None:
        """Learn the outcome of ended tasks whose refund would be due, then settle."""
        now = time.monotonic()
        pending = [
            p
            for p in self._unsettled.values()
            if p.fail_code is None and p.outputs is None and self._refund_due(p, now)
        ]
        if pending:
            # An unfetchable input is only found out by generating; a client that never
            # polled a failed task is refunded all the same.
            await asyncio.gather(*(self._ensure_outputs(p) for p in pending))
        self._settle_refunds(now)

    async def _handle_balance(self, request: web.Request) -> web.StreamResponse:
        await self._inject("account")
        await self._settle_account()
        return _ok({"balance": round(self.config.balance, 6)})

    async def _handle_price(self, request: web.Request) -> web.StreamResponse:
        await self._inject("account")
        body = await self._json_object(request)
        model_id = body.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            return _error(400, "Invalid request: 'model_id' is required")
        inputs = body.get("inputs")
        if inputs is not None and not isinstance(inputs, dict):
            return _error(400, "Invalid request: 'inputs' must be an object")
        known = self.config.known_models
        if known is not None and model_id not in known:
            return _error(404, f"Model not found: {model_id}")
        price = self._price_of(model_id)
        if self.config.price_shape == "legacy":
            return _ok({"model_id": model_id, "unit_price": price, "currency": "USD"})
        return _ok({"price": price, "discounted_price": price, "currency": "USD"})

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        await self._inject("account")
        known = self.config.known_models
        models = [
            {
                "model_id": spec.model_id,
                "name": spec.name,
                "description": spec.description,
                "type": spec.type,
                "base_price": self._price_of(spec.model_id),
                "api_schema": {
                    "api_schemas": [
                        {
                            "type": "model_run",
                            "method": "POST",
                            "api_path": f"/api/v3/{spec.model_id}",
                            "request_schema": spec.request_schema,
                        }
                    ]
                },
            }
            for spec in MODELS.values()
            if known is None or spec.model_id in known
        ]
        return _ok(models)

    async def _handle_billings(self, request: web.Request) -> web.StreamResponse:
        await self._inject("account")
        body = await self._json_object(request)
        page, page_size = _paging(body)
        uuids = body.get("prediction_uuids")
        if uuids is not None and (
            not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids)
        ):
            return _error(400, "Invalid request: 'prediction_uuids' must be a list of strings")
        after, before = _time_range(body)
        await self._settle_account()
        now = time.monotonic()
        wanted = set(uuids) if uuids is not None else None
        matching = [
            pred
            for pred in reversed(self.predictions.values())
            if (wanted is None or pred.id in wanted)
            and (after is None or pred.created_wall >= after)
            and (before is None or pred.created_wall <= before)
        ]
        chosen = matching[(page - 1) * page_size : page * page_size]
        items = []
        for pred in chosen:
            status = pred.clock_status(now)
            if status == "completed" and pred.fail_code is not None:
                status = "failed"
            items.append(
                {
                    "prediction_id": pred.id,
                    "model": pred.model,
                    "amount": pred.price,
                    "currency": "USD",
                    "status": status,
                    "created_at": _iso(pred.created_wall),
                    "refunded": pred.refunded_wall is not None,
                    "refunded_at": None if pred.refunded_wall is None else _iso(pred.refunded_wall),
                }
            )
        return _ok({"page": page, "page_size": page_size, "total": len(matching), "items": items})

    async def _handle_list(self, request: web.Request) -> web.StreamResponse:
        await self._inject("account")
        body = await self._json_object(request)
        page, page_size = _paging(body)
        model = body.get("model")
        wanted = body.get("status")
        after, before = _time_range(body)
        now = time.monotonic()
        matching: list[Prediction] = []
        for pred in reversed(self.predictions.values()):
            if pred.deleted or (model and pred.model != model):
                continue
            if not self._visible(pred, now):
                continue
            if after is not None and pred.created_wall < after:
                continue
            if before is not None and pred.created_wall > before:
                continue
            matching.append(pred)
        if wanted:
            # The clock status is enough to filter; generation is only needed to report.
            matching = [p for p in matching if _status_matches(p.clock_status(now), wanted)]
        chosen = matching[(page - 1) * page_size : page * page_size]
        statuses = await asyncio.gather(*(self._current_status(p, now) for p in chosen))
        items = [
            self._listing_item(pred, status) for pred, status in zip(chosen, statuses, strict=True)
        ]
        return _ok({"page": page, "page_size": page_size, "total": len(matching), "items": items})

    def _listing_item(self, pred: Prediction, status: str) -> dict[str, Any]:
        """Exactly the documented listing fields; the submitted body only on request."""
        data = self._prediction_data(pred, status)
        item = {key: data[key] for key in _LISTING_FIELDS if key in data}
        item["executionTime"] = pred.inference_ms if status in ("completed", "failed") else 0
        if self.config.listing_inputs:
            item["input"] = pred.body
        return item

    async def _handle_upload_ticket(self, request: web.Request) -> web.StreamResponse:
        await self._inject("upload")
        body = await self._json_object(request)
        filename = body.get("filename")
        size = body.get("size")
        content_type = body.get("content_type")
        if not isinstance(filename, str) or not filename:
            return _error(400, "Invalid request: 'filename' is required")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return _error(400, "Invalid request: 'size' must be a non-negative integer")
        if content_type is not None and not isinstance(content_type, str):
            return _error(400, "Invalid request: 'content_type' must be a string")
        if size > self.config.max_upload_bytes:
            return _error(413, f"File too large: limit is {self.config.max_upload_bytes} bytes")
        token = secrets.token_hex(16)
        ticket = _UploadTicket(
            token=token,
            filename=filename,
            size=size,
            content_type=content_type or "application/octet-stream",
            secret=secrets.token_urlsafe(18),
        )
        self._tickets[token] = ticket
        self.stats.upload_tickets += 1
        return _ok(
            {
                "type": "image",
                "download_url": self._download_url(token, filename),
                "filename": filename,
                "size": size,
                "upload": {
                    "method": "PUT",
                    "url": f"{self.cdn_url}/upload/{token}",
                    "headers": {"Content-Type": ticket.content_type, "x-emu-token": ticket.secret},
                },
            }
        )

    def _download_url(self, token: str, filename: str) -> str:
        return f"{self.cdn_url}/inputs/{token}/{quote(_safe_filename(filename))}"

    async def _handle_upload_binary(self, request: web.Request) -> web.StreamResponse:
        await self._inject("upload")
        if not request.content_type.startswith("multipart/"):
            return _error(400, "Invalid request: expected multipart/form-data with field 'file'")
        limit = self.config.max_upload_bytes
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                return _error(400, "Invalid request: multipart field 'file' is required")
            if not isinstance(part, aiohttp.BodyPartReader) or part.name != "file":
                continue
            chunks: list[bytes] = []
            total = 0
            while chunk := await part.read_chunk(_READ_CHUNK):
                total += len(chunk)
                if total > limit:
                    return _error(413, f"File too large: limit is {limit} bytes")
                chunks.append(chunk)
            data = b"".join(chunks)
            filename = part.filename or "upload.bin"
            break
        token = secrets.token_hex(16)
        declared = _mime_base(part.headers.get("Content-Type"))
        mime = _sniff_mime(data) or declared or "application/octet-stream"
        self._uploads[token] = _StoredFile(filename, data, mime)
        self.stats.uploads += 1
        return _ok(
            {
                "type": "image",
                "download_url": self._download_url(token, filename),
                "filename": filename,
                "size": len(data),
            }
        )

    # ------------------------------------------------------------ CDN handlers

    async def _handle_upload_put(self, request: web.Request) -> web.StreamResponse:
        await self._inject("upload_put")
        ticket = self._tickets.get(request.match_info["token"])
        if ticket is None:
            return _error(404, "Unknown upload URL")
        secret = request.headers.get("x-emu-token", "")
        if not hmac.compare_digest(secret.encode(), ticket.secret.encode()):
            return _error(403, "Forbidden: upload signature does not match")
        if _mime_base(request.headers.get("Content-Type")) != _mime_base(ticket.content_type):
            return _error(403, "Forbidden: Content-Type differs from the signed upload headers")
        data = await _read_whole(request.content, ticket.size)
        if data is None or len(data) != ticket.size:
            return _error(400, f"Body size does not match the announced size {ticket.size}")
        self._uploads[ticket.token] = _StoredFile(
            ticket.filename, data, _sniff_mime(data) or ticket.content_type
        )
        self.stats.uploads += 1
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        return web.Response(status=200, headers={"ETag": f'"{etag}"'})

    async def _handle_input_get(self, request: web.Request) -> web.StreamResponse:
        stored = self._uploads.get(request.match_info["token"])
        if stored is None:
            return _error(404, "Not found")
        self.stats.input_downloads += 1
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _handle_output_get(self, request: web.Request) -> web.StreamResponse:
        fault = await self._inject("download")
        stored = self._outputs.get(request.match_info["name"])
        if stored is None:
            return _error(404, "Not found")
        if fault == "garbage":
            return web.Response(body=_GARBAGE, content_type=stored.content_type)
        if fault == "truncate":
            resp = web.StreamResponse(status=200)
            resp.content_type = stored.content_type
            resp.content_length = len(stored.data) + 1024
            await resp.prepare(request)
            await resp.write(stored.data[: max(1, len(stored.data) // 2)])
            raise _Drop(resp)
        self.stats.downloads += 1
        return web.Response(body=stored.data, content_type=stored.content_type)


def _paging(body: dict[str, Any]) -> tuple[int, int]:
    page = body.get("page", 1)
    page_size = body.get("page_size", 20)
    for name, value in (("page", page), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _Reply(_error(400, f"Invalid request: '{name}' must be a positive integer"))
    if page_size > 100:
        raise _Reply(_error(400, "Invalid request: 'page_size' must be at most 100"))
    return page, page_size


def _time_range(body: dict[str, Any]) -> tuple[float | None, float | None]:
    try:
        return _parse_instant(body.get("created_after")), _parse_instant(body.get("created_before"))
    except ValueError as exc:
        raise _Reply(_error(400, f"Invalid request: {exc}")) from None


def _status_matches(status: str, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return status in wanted
    return bool(status == wanted)


def _parse_instant(value: Any) -> float | None:
    """Accept epoch seconds or ISO 8601 (a bare date/time is taken as UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("timestamps must be ISO 8601 strings or epoch seconds")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"not an ISO 8601 timestamp: {value!r}") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    raise ValueError("timestamps must be ISO 8601 strings or epoch seconds")


async def start_emulator(
    config: EmulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    cdn_port: int = 0,
) -> Emulator:
    """Start both origins on the running loop; port 0 picks a free port."""
    emulator = Emulator(config, host)
    await emulator.start(port, cdn_port)
    return emulator


@contextmanager
def serve_in_thread(
    config: EmulatorConfig | None = None, port: int = 0, cdn_port: int = 0
) -> Iterator[Emulator]:
    """Run an emulator on its own loop in a daemon thread for synchronous callers.

    Tests may mutate ``emulator.config`` and call ``script``/``fail_next_tasks`` from
    the calling thread; those touch only atomic container operations.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    started: list[Emulator] = []
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                emulator = loop.run_until_complete(
                    start_emulator(config, port=port, cdn_port=cdn_port)
                )
            except BaseException as exc:
                failure.append(exc)
                return
            started.append(emulator)
            ready.set()
            loop.run_forever()
            loop.run_until_complete(emulator.close())
            # Handlers still sleeping (scripted "slow" faults) must not outlive the loop.
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=run, name="wsbatch-emulator", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        raise failure[0]
    try:
        yield started[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def _parse_latency(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI seconds, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] < 0 or values[1] < values[0]:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return values[0], values[1]


def _parse_lognormal(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        median, sigma = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MEDIAN,SIGMA seconds, got {text!r}") from None
    if median <= 0 or sigma < 0:
        raise argparse.ArgumentTypeError(f"expected MEDIAN > 0 and SIGMA >= 0, got {text!r}")
    return median, sigma


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"probability must be within 0..1, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsbatch emulator",
        description="Local WaveSpeedAI-compatible server (API origin + separate CDN origin).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=0, help="API port (0 = pick a free one)")
    parser.add_argument("--cdn-port", type=int, default=0, help="CDN port (0 = pick a free one)")
    parser.add_argument("--latency", type=_parse_latency, default=(0.0, 0.0), metavar="LO,HI")
    parser.add_argument(
        "--latency-lognormal",
        type=_parse_lognormal,
        default=None,
        metavar="MEDIAN,SIGMA",
        help="task run time drawn lognormally (overrides --latency)",
    )
    parser.add_argument("--p-429", type=_probability, default=0.0)
    parser.add_argument("--p-5xx", type=_probability, default=0.0)
    parser.add_argument("--p-drop", type=_probability, default=0.0)
    parser.add_argument("--p-fail", type=_probability, default=0.0)
    parser.add_argument(
        "--rate-per-minute", type=int, default=None, help="sliding 60 s limit on generations"
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        metavar="N",
        help="N generations per fixed --rate-window (windows reset, as the vendor's)",
    )
    parser.add_argument("--rate-window", type=_positive, default=60.0, metavar="S")
    parser.add_argument("--max-concurrent", type=int, default=None)
    parser.add_argument("--base64-style", choices=("bare", "data_uri", "mixed"), default="bare")
    parser.add_argument("--outputs-per-task", type=int, default=1)
    parser.add_argument(
        "--send-retry-after",
        action="store_true",
        help="send Retry-After on 429 (the vendor documents none)",
    )
    parser.add_argument(
        "--retry-after", type=int, default=1, help="Retry-After seconds of injected 429s"
    )
    parser.add_argument(
        "--listing-inputs",
        action="store_true",
        help="add each task's submitted body as 'input' to the predictions listing",
    )
    parser.add_argument(
        "--visibility-delay",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="result polls of a task younger than S seconds answer 404",
    )
    parser.add_argument(
        "--sync-timeout",
        type=_non_negative,
        default=90.0,
        metavar="S",
        help="a sync-mode submit answers 'processing' (code 5004) after S seconds",
    )
    parser.add_argument("--balance", type=float, default=100.0)
    parser.add_argument("--price", type=float, default=0.024)
    parser.add_argument("--response-delay", type=float, default=0.0)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("WAVESPEED_API_KEY") or None,
        help="key to require (default: $WAVESPEED_API_KEY; unset = any non-empty key)",
    )
    parser.add_argument("--seed", type=int, default=None, help="RNG seed for fault draws")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not _is_loopback(args.host):
        parser.error(f"--host must be a loopback address, not {args.host!r}")
    for flag in ("port", "cdn_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            parser.error(f"--{flag.replace('_', '-')} must be within 0..65535")
    config = EmulatorConfig(
        api_key=args.api_key,
        latency=args.latency,
        latency_lognormal=args.latency_lognormal,
        max_concurrent=args.max_concurrent,
        rate_per_minute=args.rate_per_minute,
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        send_retry_after=args.send_retry_after,
        listing_inputs=args.listing_inputs,
        visibility_delay=args.visibility_delay,
        sync_timeout=args.sync_timeout,
        base64_style=args.base64_style,
        outputs_per_task=args.outputs_per_task,
        retry_after=args.retry_after,
        balance=args.balance,
        price=args.price,
        response_delay=args.response_delay,
        seed=args.seed,
        p_429=args.p_429,
        p_5xx=args.p_5xx,
        p_drop=args.p_drop,
        p_fail_task=args.p_fail,
        # A long-running CLI server must not grow without bound.
        record_requests=False,
    )

    async def serve() -> None:
        try:
            emulator = await start_emulator(config, args.host, args.port, args.cdn_port)
        except OSError as exc:
            print(f"wsbatch emulator: cannot listen: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        print(
            f"wsbatch emulator listening on {emulator.base_url} (cdn {emulator.cdn_url})",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await emulator.close()

    with suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
