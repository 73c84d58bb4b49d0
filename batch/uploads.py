"""Local inputs uploaded once per content, their URLs reused for 24 hours.

The cache keeps URLs, never image bytes: a file is read when it must be hashed
or uploaded, and its bytes are dropped as soon as that is done.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from batch.client import Client
from batch.events import Uploaded
from batch.files import read_bytes
from batch.ledger import LedgerWriter
from batch.state import LedgerState

Retry = Callable[[Callable[[], Awaitable[str]]], Awaitable[str]]


async def _read_and_hash(path: Path) -> tuple[str, bytes]:
    data = await read_bytes(path)
    return hashlib.sha256(data).hexdigest(), data


class _Abandoned(Exception):
    """The row reading a file for the others was stopped: another one reads it."""


class UploadCache:
    def __init__(self, client: Client, writer: LedgerWriter, state: LedgerState) -> None:
        self.client = client
        self.writer = writer
        self.state = state
        self._sha: dict[Path, asyncio.Future[str]] = {}
        self._urls: dict[str, asyncio.Future[str]] = {}
        self._reused: set[str] = set()

    async def url_for(self, path: Path, label: str, retry: Retry) -> str:
        """The URL to send for a local input, uploading it if no fresh one is known."""
        sha, data = await self._hash(path)
        future = self._urls.get(sha)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._urls[sha] = future
            reused = self.state.fresh_upload(sha, time.time(), self.client.base_url)
            if reused is not None:
                self._reused.add(sha)
                self.client.metrics.uploads_reused += 1
                future.set_result(reused)
            else:
                try:
                    url = await self._upload(path, sha, data, label, retry)
                except BaseException as exc:
                    # Let the next row that needs this image try again.
                    self._urls.pop(sha, None)
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
                    future.exception()  # retrieved: there may be no waiter
                    raise
                future.set_result(url)
        return await asyncio.shield(future)

    async def _hash(self, path: Path) -> tuple[str, bytes | None]:
        """The file's sha256, read and hashed once however many rows start on it together
        (10,000 reads of one file would hold the loop for seconds); the bytes go to the
        row that read them."""
        while True:
            pending = self._sha.get(path)
            if pending is not None:
                try:
                    return await asyncio.shield(pending), None
                except _Abandoned:
                    continue
            pending = asyncio.get_running_loop().create_future()
            self._sha[path] = pending
            try:
                sha, data = await _read_and_hash(path)
            except BaseException as exc:
                del self._sha[path]  # the next row reads it again
                pending.set_exception(exc if isinstance(exc, Exception) else _Abandoned())
                pending.exception()  # retrieved: there may be no waiter
                raise
            pending.set_result(sha)
            return sha, data

    async def _upload(
        self, path: Path, sha: str, data: bytes | None, label: str, retry: Retry
    ) -> str:
        body = data if data is not None else await self._read_again(path, sha)
        url = await retry(functools.partial(self.client.upload, path, body))
        await self.writer.write(
            Uploaded(sha256=sha, download_url=url, file=label, base_url=self.client.base_url)
        )
        return url

    @staticmethod
    async def _read_again(path: Path, sha: str) -> bytes:
        sha_now, data = await _read_and_hash(path)
        if sha_now != sha:
            raise OSError(f"{path} changed during the run")
        return data

    def forget_reused(self, path: Path) -> bool:
        """An upload reused from an earlier run turned out expired: upload afresh, once."""
        known = self._sha.get(path)
        sha = known.result() if known is not None and known.done() else None
        if sha is None or sha not in self._reused:
            return False
        self._reused.discard(sha)
        self._urls.pop(sha, None)
        self.state.uploads.pop(sha, None)
        return True
