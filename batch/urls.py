"""Base URLs: which API origin a run talks to, checked before anything is sent.

Kept apart from the HTTP stack so that `validate`, `status` and the other offline
commands start without loading it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from batch.errors import UsageError

DEFAULT_BASE_URL = "https://api.wavespeed.ai"
BASE_URL_ENV = "WAVESPEED_BASE_URL"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
IPV6_ADVICE = "not a valid IPv6 address: write one in brackets, as http://[::1]:8080"
# The host and port of a URL's netloc: a bracketed IPv6 literal or a name, then digits.
NETLOC_HOST = re.compile(r"(?:\[(?P<ip6>[^\[\]]*)\]|(?P<name>[^\[\]:]*))(?::(?P<port>[^:]*))?")
# Dotted labels of letters, digits, '-' and '_' (IPv4 literals match too), checked in
# their ASCII (IDNA) form.
LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){LABEL}(?:\.{LABEL})*\.?", re.IGNORECASE)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_problem(host_port: str) -> str | None:
    """Why the host and port of a netloc cannot be connected to, else None."""
    match = NETLOC_HOST.fullmatch(host_port)
    if match is None:
        return IPV6_ADVICE
    port = match["port"]
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return "the port must be a number within 1..65535"
    if match["ip6"] is not None:
        try:
            ipaddress.IPv6Address(match["ip6"])
        except ValueError:
            return IPV6_ADVICE
        return None
    name = match["name"]
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    if not HOST_NAME.fullmatch(ascii_name):
        return f"{name!r} is not a host name"
    return None


def check_base_url(base_url: str, source: str = "base URL") -> str:
    """Refuse base URLs that cannot work or would leak the key: plain http is for
    loopback only. ``source`` names where the URL came from (a flag or a variable)."""
    text = base_url.strip()
    authority = re.split(r"[/?#]", text.partition("://")[2], maxsplit=1)[0]
    if "@" in authority:  # checked first: never echo a password
        raise UsageError(f"{source} must not carry credentials")
    shown = f"{source} {text!r}"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise UsageError(f"{shown}: a URL has no spaces or control characters")
    try:
        parts = urlsplit(text)
    except ValueError:  # an unclosed '[' or a bad address inside brackets
        raise UsageError(f"{shown}: {IPV6_ADVICE}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{shown} must be an http(s) URL")
    problem = _host_problem(parts.netloc)
    if problem:
        raise UsageError(f"{shown}: {problem}")
    if parts.query or parts.fragment:
        raise UsageError(f"{shown}: a base URL has no query or fragment")
    host = parts.hostname or ""
    if parts.scheme == "http" and not is_loopback(host):
        raise UsageError(
            f"refusing plain http:// to {host} ({source}): the API key would travel "
            "unencrypted; use https, or http only for a loopback emulator"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def resolve_base_url(base_url: str | None, source: str = "base_url") -> str:
    """``base_url`` when given (``source`` names it in messages), else WAVESPEED_BASE_URL
    when set, else the vendor's; checked either way."""
    if base_url is not None:
        return check_base_url(base_url, source)
    from_env = os.environ.get(BASE_URL_ENV, "")
    if from_env.strip():
        return check_base_url(from_env, BASE_URL_ENV)
    return check_base_url(DEFAULT_BASE_URL)
