"""Benchmarks: wsbatch against the vendor's SDK, and at scale (``make bench``)."""
