"""Loading 100k rows at once: keep the cyclic garbage collector out of the way."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_freeze = False


def freeze_bulk_loads() -> None:
    """From now on, move what a bulk load built out of the collector's sight when it ends.

    For a process that lives for one command (the CLI): a 1M-row manifest and ledger
    are a few million objects that live until exit, and each time the collector
    promotes them it walks them all again (seconds at that size). A library caller's
    process is left as it is.
    """
    global _freeze
    _freeze = True


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small acyclic objects.

    Each of the ~100k rows, row states and parsed events is an allocation that
    counts toward the next collection, and every full collection walks all of the
    ones before: about a quarter of a 100k-row load. Nothing built here forms
    cycles, so nothing is lost by collecting once at the end instead.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _freeze:
            gc.freeze()  # acyclic: refcounts still free whatever of it is dropped
        if was_enabled:
            gc.enable()
