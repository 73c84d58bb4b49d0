"""Secrets that ride inside URLs, kept out of everything wsbatch writes or prints.

A manifest may name an image as ``https://user:pass@host/x.png`` or as a signed
URL (S3, GCS, Azure SAS). The request sends it unchanged, since the server has to
fetch it; the ledger, metadata, report, exports, logs and messages get it with
the password and the signature replaced by ``***``.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry a signature, a credential or a token (lower case).
SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "signature",
        "sig",
        "token",
        "access_token",
        "id_token",
        "api_key",
        "apikey",
        "key",
        "password",
        "secret",
        "client_secret",
        "auth",
    }
)
# A URL in prose ends before trailing punctuation ("failed to fetch URL: 403").
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]*[^\s\"'<>.,:;)\]}]")


def redact_url(url: str) -> str:
    """The URL with its userinfo and secret query values masked; anything that does not
    parse as a URL comes back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode(
                [(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*"
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside a message, redacted."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
