"""wsbatch: edit every row of a manifest exactly once through WaveSpeedAI's API."""

from __future__ import annotations

__version__ = "0.1.0"
