"""Loading 100k rows at once: keep the cyclic garbage collector out of the way."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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
        if was_enabled:
            gc.enable()
