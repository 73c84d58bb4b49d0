"""wsbatch: edit every row of a manifest exactly once through WaveSpeedAI's API.

The public API (``run_manifest``, ``run_manifest_async``, ``load_manifest``,
``Ledger``) is imported on first use, so reading a ledger never loads the HTTP stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Ledger": "batch.api",
    "run_manifest": "batch.api",
    "run_manifest_async": "batch.api",
    "Manifest": "batch.manifest",
    "Row": "batch.manifest",
    "load_manifest": "batch.manifest",
    "Summary": "batch.runner",
}

__all__ = [
    "Ledger",
    "Manifest",
    "Row",
    "Summary",
    "__version__",
    "load_manifest",
    "run_manifest",
    "run_manifest_async",
]

if TYPE_CHECKING:
    from batch.api import Ledger, run_manifest, run_manifest_async
    from batch.manifest import Manifest, Row, load_manifest
    from batch.runner import Summary


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batch' has no attribute {name!r}")
    return getattr(import_module(module), name)
