"""Credentials inside image URLs reach the server unchanged and nothing else."""

from __future__ import annotations

import json

import pytest

from batch.redact import redact_text, redact_url

SECRET = "hunter2-very-secret"


@pytest.mark.parametrize(
    ("url", "kept", "gone"),
    [
        (f"https://user:{SECRET}@img.example/x.png", "img.example/x.png", SECRET),
        (f"https://{SECRET}@img.example/x.png", "img.example/x.png", SECRET),
        (
            "https://b.s3.amazonaws.com/x.png?X-Amz-Algorithm=AWS4&X-Amz-Credential="
            f"AKIA%2F1&X-Amz-Signature={SECRET}",
            "X-Amz-Algorithm=AWS4",
            SECRET,
        ),
        (f"https://acct.blob.core.windows.net/c/x.png?sv=2022&sig={SECRET}", "sv=2022", SECRET),
        (f"https://storage.googleapis.com/b/x.png?X-Goog-Signature={SECRET}", "b/x.png", SECRET),
    ],
)
def test_urls_lose_their_secrets_and_keep_the_rest(url, kept, gone):
    """Userinfo and signature parameters are masked; host, path and plain parameters
    stay readable."""
    out = redact_url(url)
    assert gone not in out and kept in out and "***" in out
    assert redact_text(f"could not fetch {url}: 403") == f"could not fetch {out}: 403"


def test_plain_urls_and_text_are_unchanged():
    """Nothing to hide: the text is returned as it was."""
    for text in ("https://img.example/x.png?w=10", "images/a.png", "no url here"):
        assert redact_url(text) == text and redact_text(text) == text


def test_a_credentialed_image_url_is_sent_whole_and_written_nowhere(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """The submit carries the URL with its password (the server must fetch it); the
    ledger, metadata.jsonl, report.html, exports and printed output do not."""
    import asyncio

    from batch.client import Client
    from tests.conftest import API_KEY

    async def upload() -> str:
        async with Client(emulator.base_url, API_KEY) as client:
            return await client.upload(images[0], images[0].read_bytes())

    url = asyncio.run(upload()).replace("://", f"://user:{SECRET}@", 1)
    path = write_manifest([{"id": "r1", "image": url, "prompt": "p", "seed": 1}])
    result = run(path)
    assert result.code == 0, result.err
    bodies = [p.body for p in emulator.predictions.values() if p.body.get("image") == url]
    assert bodies, "the server must get the URL unchanged"
    out = tmp_path / "out"
    assert cli("report", out).code == 0
    assert cli("export", out, "--format", "webdataset", "--to", tmp_path / "wds").code == 0
    assert cli("export", out, "--format", "parquet", "--to", tmp_path / "pq").code == 0
    assert SECRET not in result.out + result.err
    for file in [*out.rglob("*"), *(tmp_path / "wds").rglob("*"), *(tmp_path / "pq").rglob("*")]:
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    assert any("***@" in json.dumps(e) for e in map(json.loads, (out / "ledger.jsonl").open()))
