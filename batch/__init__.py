"""wsbatch: edit every row of a manifest exactly once through WaveSpeedAI's API."""

from __future__ import annotations

__version__ = "0.1.0"

from batch.api import Ledger, run_manifest, run_manifest_async
from batch.manifest import Manifest, Row, load_manifest
from batch.runner import Summary

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
