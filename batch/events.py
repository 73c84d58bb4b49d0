"""The ledger's events: every row fact wsbatch records, typed and frozen.

The ledger is a public interface that users parse, so the names here are the
JSON names: documented events and fields stay (add, never rename), and
``SCHEMA`` in the ``run`` event says which version wrote a file. Readers skip
unknown events and unknown keys; ``decode`` turns one parsed JSON object into
an event, or None when it is not one this version knows.

A submit's life in the ledger::

    submitting (durable intent, before the request leaves)
      -> submitted        the answer carried a prediction id: billed, followed by id
      -> submit_refused   the server refused it: nothing created, nothing billed
      -> submit_unknown   sent, no usable answer: maybe created, counted as a
                          possible duplicate and as spend
    an intent with none of these after it (a kill in between) counts like
    submit_unknown, until

    submit_settled        the account's listing settled an unknown outcome: nothing
                          was created ("absent": no longer a possible duplicate), or
                          a task no ledger knows was created since ("orphan": it stays
                          a possible duplicate, now with its id). A task that matches
                          every field sent is adopted instead, with ``submitted``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SCHEMA = 2


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_NO_META: Mapping[str, Any] = MappingProxyType({})  # shared: most events carry no meta


@dataclass(frozen=True, slots=True)
class RunStarted:
    """A run began: what it ran, where, and at which price it counts its submits."""

    run_id: str
    manifest: str
    model: str
    base_url: str
    version: str
    price: float
    rows: int = 0
    manifest_rows: int = 0
    shard: str | None = None
    pid: int | None = None
    concurrency: int | None = None
    rate: float | None = None
    budget: float | None = None
    schema: int = SCHEMA
    # The manifest file's absolute path: a folder holds one manifest's rows.
    manifest_path: str | None = None
    kind = "run"


@dataclass(frozen=True, slots=True)
class Uploaded:
    """A local input was uploaded; its URL is reused for 24 hours."""

    sha256: str
    download_url: str
    file: str
    base_url: str
    kind = "uploaded"


@dataclass(frozen=True, slots=True)
class Submitting:
    """Durable intent, written (and fsync'ed) before a submit request is sent."""

    row: str
    seed: int
    intent: str
    price: float
    fingerprint: str | None = None
    # sha256 of the request's fields (``request_keys``) as canonical JSON: what lets a
    # listing that carries inputs prove, later, that a task is this request and no other.
    request_sha: str | None = None
    request_keys: tuple[str, ...] = ()
    model: str | None = None
    kind = "submitting"


@dataclass(frozen=True, slots=True)
class Submitted:
    """The submit's answer named a prediction: a billed task we can follow."""

    row: str
    prediction_id: str
    seed: int
    attempt: int
    intent: str | None = None
    price: float | None = None
    fingerprint: str | None = None
    # Written by ledgers before schema 2, which counted lost answers here.
    possible_duplicates: int = 0
    kind = "submitted"


@dataclass(frozen=True, slots=True)
class SubmitRefused:
    """The server refused the submit (429, 4xx, connection refused): nothing was created."""

    row: str
    intent: str
    error: str
    status: int | None = None
    kind = "submit_refused"


@dataclass(frozen=True, slots=True)
class SubmitUnknown:
    """The submit was sent and no usable answer came: a possible duplicate, counted as spend."""

    row: str
    intent: str
    error: str
    status: int | None = None
    kind = "submit_unknown"


@dataclass(frozen=True, slots=True)
class SubmitSettled:
    """An unknown submit outcome, settled from the account's listing."""

    row: str
    intent: str
    outcome: str  # "absent" or "orphan"
    prediction_id: str | None = None  # the orphan
    kind = "submit_settled"


ABSENT = "absent"
ORPHAN = "orphan"


@dataclass(frozen=True, slots=True)
class Completed:
    """The row's outputs are on disk, whole."""

    row: str
    prediction_id: str
    outputs: tuple[str, ...]
    sha256: tuple[str, ...] = ()
    nsfw: tuple[bool, ...] = ()
    inference_ms: int | None = None
    seed: int | None = None
    fingerprint: str | None = None
    model: str | None = None
    prompt: str | None = None
    image: str | None = None
    image_path: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    kind = "completed"


@dataclass(frozen=True, slots=True)
class Failed:
    """This attempt at the row ended without outputs.

    ``retryable`` rows are tried again by the next run; the others only with
    ``--retry-failed``. ``live`` says the prediction may still be on the server
    (a timeout, an output that could not be written): the next run polls
    ``prediction_id`` rather than paying again.
    """

    row: str
    error: str
    retryable: bool
    prediction_id: str | None = None
    code: int | str | None = None
    task_status: str | None = None
    live: bool = False
    attempt: int = 0
    seed: int | None = None
    fingerprint: str | None = None
    model: str | None = None
    prompt: str | None = None
    image: str | None = None
    image_path: str | None = None
    # Written by ledgers before schema 2, which counted lost answers here too.
    possible_duplicates: int = 0
    kind = "failed"


@dataclass(frozen=True, slots=True)
class Finished:
    run_id: str
    summary: Mapping[str, Any]
    kind = "finished"


Event = (
    RunStarted
    | Uploaded
    | Submitting
    | Submitted
    | SubmitRefused
    | SubmitUnknown
    | SubmitSettled
    | Completed
    | Failed
    | Finished
)
RowEvent = (
    Submitting | Submitted | SubmitRefused | SubmitUnknown | SubmitSettled | Completed | Failed
)

# Statuses after which a prediction will never complete.
TERMINAL_FAILURES = frozenset({"failed", "cancelled", "canceled", "timeout"})


def encode(event: Event) -> dict[str, Any]:
    """The JSON object for one event (without ``ts``, which the writer stamps)."""
    out: dict[str, Any] = {"event": event.kind}
    for name in event.__dataclass_fields__:
        value = getattr(event, name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            if not value:
                continue  # an empty meta says nothing
            value = dict(value)
        out[name] = value
    if isinstance(event, Submitted | Failed) and not event.possible_duplicates:
        del out["possible_duplicates"]
    if isinstance(event, Submitting) and event.request_sha is None:
        del out["request_sha"], out["request_keys"]
    if isinstance(event, Submitting) and event.model is None:
        del out["model"]
    if isinstance(event, SubmitSettled) and event.prediction_id is None:
        del out["prediction_id"]
    return out


def _run(d: Mapping[str, Any]) -> RunStarted | None:
    price = _float(d.get("price"))
    return RunStarted(
        run_id=_str(d.get("run_id")) or "",
        manifest=_str(d.get("manifest")) or "",
        model=_str(d.get("model")) or "",
        base_url=_str(d.get("base_url")) or "",
        version=_str(d.get("version")) or "",
        price=price if price is not None and price >= 0 else -1.0,
        rows=_int(d.get("rows")) or 0,
        manifest_rows=_int(d.get("manifest_rows")) or 0,
        shard=_str(d.get("shard")),
        pid=_int(d.get("pid")),
        concurrency=_int(d.get("concurrency")),
        rate=_float(d.get("rate")),
        budget=_float(d.get("budget")),
        schema=_int(d.get("schema")) or 1,
        manifest_path=_str(d.get("manifest_path")),
    )


# The decoders below run after ``check_shape``: each field they read is absent, null
# (where null is allowed) or of its checked type, so they take values as they are. A
# 1M-row resume decodes a million events; re-checking each field costs a second.


def _uploaded(d: Mapping[str, Any]) -> Uploaded | None:
    return Uploaded(d["sha256"], d["download_url"], d.get("file") or "", d.get("base_url") or "")


def _submitting(d: Mapping[str, Any]) -> Submitting | None:
    seed, price, keys = d.get("seed"), d.get("price"), d.get("request_keys")
    return Submitting(
        row=d["row"],
        seed=seed if seed is not None else -1,
        intent=d["intent"],
        price=float(price) if price is not None else 0.0,
        fingerprint=d.get("fingerprint"),
        request_sha=d.get("request_sha"),
        request_keys=tuple(keys) if keys else (),
        model=d.get("model"),
    )


def _submitted(d: Mapping[str, Any]) -> Submitted | None:
    seed, price = d.get("seed"), d.get("price")
    return Submitted(
        row=d["row"],
        # Without an id (a hand-made or damaged line) the row is paid for but cannot be
        # followed: the plan submits it again.
        prediction_id=d["prediction_id"],
        seed=seed if seed is not None else -1,
        attempt=d.get("attempt") or 0,
        intent=d.get("intent"),
        price=float(price) if price is not None else None,
        fingerprint=d.get("fingerprint"),
        possible_duplicates=max(d.get("possible_duplicates") or 0, 0),
    )


def _settled(cls: type[SubmitRefused] | type[SubmitUnknown]) -> Callable[..., Any]:
    def decode_settled(d: Mapping[str, Any]) -> SubmitRefused | SubmitUnknown | None:
        return cls(d["row"], d["intent"], d.get("error") or "", d.get("status"))

    return decode_settled


def _submit_settled(d: Mapping[str, Any]) -> SubmitSettled | None:
    outcome = d["outcome"]
    if outcome not in (ABSENT, ORPHAN):
        return None
    pid = d.get("prediction_id")
    if outcome == ORPHAN and not pid:
        return None
    return SubmitSettled(d["row"], d["intent"], outcome, pid if outcome == ORPHAN else None)


def _completed(d: Mapping[str, Any]) -> Completed | None:
    get = d.get
    inference, meta = get("inference_ms"), get("meta")
    return Completed(
        d["row"],
        get("prediction_id") or "",
        tuple(d["outputs"]),
        tuple(get("sha256") or ()),
        tuple(get("nsfw") or ()),
        int(inference) if inference is not None else None,
        get("seed"),
        get("fingerprint"),
        get("model"),
        get("prompt"),
        get("image"),
        get("image_path"),
        meta if meta is not None else _NO_META,
    )


def _failed(d: Mapping[str, Any]) -> Failed | None:
    get = d.get
    pid = get("prediction_id") or None
    task_status = get("task_status")
    retryable = bool(get("retryable"))
    live = get("live")
    if live is None:
        # Ledgers before schema 2: a retryable failure of a task that had not ended.
        live = retryable and pid is not None and task_status not in TERMINAL_FAILURES
    return Failed(
        row=d["row"],
        error=get("error") or "",
        retryable=retryable,
        prediction_id=pid,
        code=get("code"),
        task_status=task_status,
        live=live and pid is not None,
        attempt=get("attempt") or 0,
        seed=get("seed"),
        fingerprint=get("fingerprint"),
        model=get("model"),
        prompt=get("prompt"),
        image=get("image"),
        image_path=get("image_path"),
        possible_duplicates=max(get("possible_duplicates") or 0, 0),
    )


def _finished(d: Mapping[str, Any]) -> Finished | None:
    summary = d.get("summary")
    return Finished(_str(d.get("run_id")) or "", summary if isinstance(summary, dict) else {})


_DECODERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "run": _run,
    "uploaded": _uploaded,
    "submitting": _submitting,
    "submitted": _submitted,
    "submit_refused": _settled(SubmitRefused),
    "submit_unknown": _settled(SubmitUnknown),
    "submit_settled": _submit_settled,
    "completed": _completed,
    "failed": _failed,
    "finished": _finished,
}


class DamagedLine(ValueError):
    """A line of a known event whose fields are missing or of the wrong type."""


# A field's check: the exact Python types its JSON value may have (bool is not an int
# here), and a further test where the type alone does not say enough.
_Check = tuple[frozenset[type], Callable[[Any], bool] | None]


def _finite(v: Any) -> bool:
    return math.isfinite(v)


def _amount(v: Any) -> bool:
    return math.isfinite(v) and v >= 0


# JSON values are never subclasses of str, and nothing subclasses bool: isinstance is
# the exact type check here, mapped in C over the list.
_is_str = str.__instancecheck__
_is_bool = bool.__instancecheck__


def _all_str(v: Any) -> bool:
    return all(map(_is_str, v))


def _all_bool(v: Any) -> bool:
    return all(map(_is_bool, v))


_STR: _Check = (frozenset({str}), None)
_INT: _Check = (frozenset({int}), None)
_AMOUNT: _Check = (frozenset({int, float}), _amount)
_BOOL: _Check = (frozenset({bool}), None)
_STRS: _Check = (frozenset({list}), _all_str)
_BOOLS: _Check = (frozenset({list}), _all_bool)
_CODE: _Check = (frozenset({int, str}), None)
_DICT: _Check = (frozenset({dict}), None)

_REQUEST: dict[str, _Check] = {
    "fingerprint": _STR,
    "model": _STR,
    "prompt": _STR,
    "image": _STR,
    "image_path": _STR,
}
# A submit's refusal or lost answer: the same fields either way.
_ANSWER: tuple[frozenset[str], dict[str, _Check]] = (
    frozenset({"row", "intent"}),
    {"row": _STR, "intent": _STR, "error": _STR, "status": _INT},
)
# Per known event: fields it must have, and the check of every field it may have (null is
# allowed for the optional ones). A line that breaks these is damage, never a fact.
_SHAPES: dict[str, tuple[frozenset[str], dict[str, _Check]]] = {
    "uploaded": (
        frozenset({"sha256", "download_url"}),
        {"sha256": _STR, "download_url": _STR, "file": _STR, "base_url": _STR},
    ),
    "submitting": (
        frozenset({"row", "intent"}),
        {
            "row": _STR,
            "intent": _STR,
            "seed": _INT,
            "price": _AMOUNT,
            "fingerprint": _STR,
            "request_sha": _STR,
            "request_keys": _STRS,
            "model": _STR,
        },
    ),
    "submitted": (
        frozenset({"row", "prediction_id"}),
        {
            "row": _STR,
            "prediction_id": _STR,
            "seed": _INT,
            "attempt": _INT,
            "intent": _STR,
            "price": _AMOUNT,
            "fingerprint": _STR,
            "possible_duplicates": _INT,
        },
    ),
    "submit_refused": _ANSWER,
    "submit_unknown": _ANSWER,
    "submit_settled": (
        frozenset({"row", "intent", "outcome"}),
        {"row": _STR, "intent": _STR, "outcome": _STR, "prediction_id": _STR},
    ),
    "completed": (
        frozenset({"row", "outputs"}),
        {
            "row": _STR,
            "prediction_id": _STR,
            "outputs": _STRS,
            "sha256": _STRS,
            "nsfw": _BOOLS,
            "inference_ms": _AMOUNT,
            "seed": _INT,
            "meta": _DICT,
            **_REQUEST,
        },
    ),
    "failed": (
        frozenset({"row"}),
        {
            "row": _STR,
            "error": _STR,
            "retryable": _BOOL,
            "prediction_id": _STR,
            "code": _CODE,
            "task_status": _STR,
            "live": _BOOL,
            "attempt": _INT,
            "seed": _INT,
            "possible_duplicates": _INT,
            **_REQUEST,
        },
    ),
}
# Fields whose null is a damage, not "not given": an event without them means nothing.
_NOT_NULL = frozenset({"row", "intent", "outputs", "sha256", "download_url", "outcome"})


def check_shape(d: Mapping[str, Any]) -> None:
    """Raise ``DamagedLine`` when a known event's fields are missing or mistyped."""
    kind = d.get("event")
    shape = _SHAPES.get(kind) if isinstance(kind, str) else None
    if shape is None:
        return
    required, checks = shape
    for name in required:
        if d.get(name) is None:
            raise DamagedLine(f"{kind} without {name}")
    for name, value in d.items():
        check = checks.get(name)
        if check is None:
            continue  # a field this version does not know: newer writers add fields
        if value is None:
            if name in _NOT_NULL:
                raise DamagedLine(f"{kind} with {name}: null")
            continue
        types, extra = check
        if type(value) not in types or (extra is not None and not extra(value)):
            raise DamagedLine(f"{kind} with a bad {name}: {str(value)[:40]!r}")


def decode(d: Mapping[str, Any]) -> Event | None:
    """The event a parsed ledger line holds, or None for a kind this version does not
    know (newer writers). A known event with broken fields raises ``DamagedLine``."""
    kind = d.get("event")
    if not isinstance(kind, str):
        raise DamagedLine("a line without an event name")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return None
    check_shape(d)
    event: Event | None = decoder(d)
    if event is None:
        raise DamagedLine(f"{d.get('event')} that says nothing usable")
    return event


def completed_facts(
    d: Mapping[str, Any],
) -> tuple[str, str, tuple[str, ...], int | None, str | None]:
    """(row, prediction_id, outputs, seed, fingerprint) of a ``completed`` line that passed
    ``check_shape``, without building a ``Completed``: most lines of a finished run's
    ledger are these, and a resume needs only these facts of them."""
    get = d.get
    pid = get("prediction_id") or ""
    return d["row"], pid, tuple(d["outputs"]), get("seed"), get("fingerprint")


# A ``completed`` line exactly as wsbatch writes it, its fields in ``encode``'s order and
# each of a kind ``check_shape`` accepts: read without parsing it as JSON. A line laid out
# any other way (another order, spaces, escapes in a captured value, meta, a field added
# by a newer writer) is not matched and is read in full, damage checks and all.
# Possessive runs (``*+``) and the escape loop unrolled: each character is looked at once
# and nothing is backtracked, four times faster than a per-character alternation, and
# the same strings match (no run can end in a character the next part starts with).
_BARE = r'"([^"\\\x00-\x1f]*+)"'  # a string with nothing escaped in it: its text as is
_PLAIN = r'[^"\\\x00-\x1f]*+'
_JSON_STR = rf'"{_PLAIN}(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{{4}}){_PLAIN})*+"'
_TEXT = f"(?:{_JSON_STR}|null)"
_NAME = r'"[A-Za-z0-9._-]*+"'  # an output's name (a row id and an extension)
_TRUTH = "(?:true|false)"
COMPLETED_LINE = re.compile(
    r'\{"ts":'
    + _BARE
    + r',"event":"completed","row":'
    + _BARE
    + r',"prediction_id":'
    + _BARE
    + rf',"outputs":\[((?:{_NAME}(?:,{_NAME})*+)?)\]'
    + rf',"sha256":\[(?:{_JSON_STR}(?:,{_JSON_STR})*+)?\]'
    + rf',"nsfw":(?:\[(?:{_TRUTH}(?:,{_TRUTH})*+)?\]|null)'
    + r',"inference_ms":(?:(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,17})?|null)'
    + r',"seed":(?:(-?(?:0|[1-9][0-9]{0,17}))|null)'
    + rf',"fingerprint":(?:{_BARE}|null)'
    + rf'(?:,"model":{_TEXT})?(?:,"prompt":{_TEXT})?(?:,"image":{_TEXT})?'
    + rf'(?:,"image_path":{_TEXT})?\}}'
)


def completed_line_facts(
    match: re.Match[str],
) -> tuple[str, tuple[str, str, tuple[str, ...], int | None, str | None]]:
    """(ts, facts as ``completed_facts`` gives them) of a line ``COMPLETED_LINE`` matched."""
    ts, row, pid, names, seed, fingerprint = match.groups()
    if not names:
        outputs: tuple[str, ...] = ()
    elif '","' in names:
        outputs = tuple(names[1:-1].split('","'))
    else:
        outputs = (names[1:-1],)  # the common case, without a list made and dropped
    return ts, (row, pid, outputs, int(seed) if seed is not None else None, fingerprint)


# ``submitting`` and ``submitted`` lines exactly as wsbatch writes them: with the
# ``completed`` line they are a finished run's ledger, three lines a row. As with
# COMPLETED_LINE, a line laid out any other way, or a price json reads as infinite
# (damage), is read in full, damage checks and all.
_INT_TEXT = r"(-?(?:0|[1-9][0-9]*+))"
_AMOUNT_TEXT = r"((?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][-+]?[0-9]++)?)"
_OPT_BARE = rf"(?:{_BARE}|null)"
SUBMITTING_LINE = re.compile(
    r'\{"ts":'
    + _BARE
    + r',"event":"submitting","row":'
    + _BARE
    + rf',"seed":{_INT_TEXT},"intent":{_BARE},"price":{_AMOUNT_TEXT}'
    + rf',"fingerprint":{_OPT_BARE}'
    + rf'(?:,"request_sha":{_OPT_BARE},"request_keys":\[((?:{_NAME}(?:,{_NAME})*+)?)\])?'
    + rf'(?:,"model":{_OPT_BARE})?\}}'
)
SUBMITTED_LINE = re.compile(
    r'\{"ts":'
    + _BARE
    + r',"event":"submitted","row":'
    + _BARE
    + rf',"prediction_id":{_BARE},"seed":{_INT_TEXT},"attempt":{_INT_TEXT}'
    + rf',"intent":{_BARE},"price":(?:{_AMOUNT_TEXT}|null),"fingerprint":{_OPT_BARE}'
    + rf'(?:,"possible_duplicates":{_INT_TEXT})?\}}'
)
# What a ``submitting`` and a ``submitted`` event say, their fields in order (those
# ``apply`` reads): how the reducer takes them from an event and from a line alike.
SubmittingFacts = tuple[str, int, str, float, str | None, str | None, tuple[str, ...], str | None]
SubmittedFacts = tuple[str, str, int, str | None, float | None, str | None, int]


def submitting_line_facts(match: re.Match[str]) -> tuple[str, SubmittingFacts] | None:
    """(ts, the ``Submitting`` fields in order) of a line ``SUBMITTING_LINE`` matched, as
    ``decode`` would give them; None for a price json reads as infinite."""
    ts, row, seed, intent, price, fingerprint, sha, keys, model = match.groups()
    amount = float(price)
    if not math.isfinite(amount):
        return None
    names = _KEY_LISTS.get(keys) if keys else ()
    if names is None:
        names = tuple(keys[1:-1].split('","'))
        if len(_KEY_LISTS) < 64:  # a run sends a few shapes of request: one tuple each
            _KEY_LISTS[keys] = names
    return ts, (row, int(seed), intent, amount, fingerprint, sha, names, model)


_KEY_LISTS: dict[str, tuple[str, ...]] = {}


def submitted_line_facts(match: re.Match[str]) -> tuple[str, SubmittedFacts] | None:
    """(ts, the ``Submitted`` fields ``apply`` reads) of a line ``SUBMITTED_LINE``
    matched, as ``decode`` would give them; None for a price json reads as infinite."""
    ts, row, pid, seed, _attempt, intent, price, fingerprint, duplicates = match.groups()
    amount = float(price) if price is not None else None
    if amount is not None and not math.isfinite(amount):
        return None
    lost = max(int(duplicates), 0) if duplicates is not None else 0
    return ts, (row, pid, int(seed), intent, amount, fingerprint, lost)
