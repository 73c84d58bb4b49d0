"""Which manifest an output folder belongs to: one folder, one manifest's rows."""

from __future__ import annotations

from pathlib import Path

from batch.errors import UsageError
from batch.ledger import first_manifest, ledger_paths
from batch.manifest import Manifest


def manifest_file(manifest: Manifest) -> str | None:
    """The manifest's absolute path, or None when it stands for command-line flags."""
    path = manifest.path
    return str(path.resolve()) if path.is_file() else None


def check_owner(out_dir: Path, manifest: Manifest, ledgers: list[Path] | None = None) -> None:
    """A folder holds one manifest's rows: another manifest's run there would overwrite
    its outputs (same row ids) and pay for rows that are done. Refused before anything
    is sent; a manifest that moved (its old path gone) keeps its folder. ``ledgers`` are
    the folder's, when the caller has listed them already (a listing of a million
    outputs takes most of a second)."""
    mine = manifest_file(manifest)
    if mine is None:
        return
    for path in ledger_paths(out_dir) if ledgers is None else ledgers:
        owner = first_manifest(path)
        if owner is not None and owner != mine and Path(owner).exists():
            raise UsageError(
                f"{out_dir} holds the rows of {owner}; running {manifest.path} there would "
                "overwrite its outputs. Give this manifest its own folder with --out (or "
                "`out:` in the manifest)"
            )


def default_out_dir(manifest: Manifest) -> Path:
    configured = manifest.settings.get("out")
    if configured:
        return (manifest.path.parent / str(configured)).resolve()
    return Path("output") / manifest.path.stem
