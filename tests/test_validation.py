"""Broken manifests are refused whole by `validate` and `run`, located, and send nothing.

Every case in ``CASES`` is a file under ``tests/corpus/`` or is made in a temporary
copy of it (binary, non-UTF-8, unreadable and oversized inputs). Each one goes
through both commands as a real subprocess against a live emulator.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from batch.emulator import Emulator, EmulatorConfig, serve_in_thread
from tests.conftest import API_KEY, WriteManifest, make_image, run_subprocess

CORPUS = Path(__file__).resolve().parent / "corpus"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Case:
    name: str  # file name in the corpus folder
    expect: tuple[tuple[str, int | None], ...]  # (field, line) pairs stderr must name
    text: str = ""  # a fragment of the reason stderr must contain
    make: Callable[[Path], None] | None = None  # writes a generated case into the folder
    unreadable: bool = False  # relies on chmod 000 stopping a read


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return make


def _unreadable(name: str, data: bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).write_bytes(data)
        (folder / name).chmod(0)

    return make


def _unreadable_image(folder: Path) -> None:
    (folder / "unreadable-image.yaml").write_text("- image: images/locked.png\n  prompt: x\n")
    _unreadable("images/locked.png", PNG_MAGIC + bytes(64))(folder)


def _big_image(folder: Path) -> None:
    """A sparse 21 MB file that starts like a PNG."""
    (folder / "too-big.yaml").write_text("- image: images/big.png\n  prompt: add snow\n")
    with open(folder / "images" / "big.png", "wb") as fh:
        fh.write(PNG_MAGIC)
        fh.truncate(21 * 1024 * 1024)


CASES = [
    # malformed files
    Case("yaml-syntax.yaml", (("yaml", 6),), "flow sequence at line 5"),
    Case("yaml-bad-date.yaml", (("yaml", 3),), "month must be in 1..12"),
    Case("csv-unclosed-quote.csv", (("csv", 3),), "syntax error"),
    Case("jsonl-syntax.jsonl", (("json", 2),), "syntax error"),
    Case("empty.yaml", (("manifest", None),), "is empty"),
    Case(
        "not-utf8.csv",
        (("manifest", 2),),
        "not valid UTF-8",
        make=_write("not-utf8.csv", b"image,prompt\nimages/ok.png,caf\xe9 au lait\n"),
    ),
    Case(
        "binary.yaml",
        (("manifest", None),),
        "binary",
        make=_write("binary.yaml", bytes(range(256)) * 4),
    ),
    Case(
        "unreadable-manifest.yaml",
        (("manifest", None),),
        "cannot be read",
        make=_unreadable("unreadable-manifest.yaml", b"- image: images/ok.png\n  prompt: x\n"),
        unreadable=True,
    ),
    Case("row-not-mapping.yaml", (("rows", 4),), "must be a mapping"),
    # required fields and types
    Case("missing-image.yaml", (("image", 5),), "is required"),
    Case("null-image.jsonl", (("image", 1),), "is required"),
    Case("missing-prompt.jsonl", (("prompt", 2),), "is required"),
    Case("prompt-number.yaml", (("prompt", 2),), "must be a string"),
    Case(
        "prompt-too-long.jsonl",
        (("prompt", 1),),
        "over 10000",
        make=_write(
            "prompt-too-long.jsonl",
            b'{"image": "images/ok.png", "prompt": "' + b"a" * 10_001 + b'"}\n',
        ),
    ),
    Case("seed-word.yaml", (("seed", 3),), "must be an integer"),
    Case("seed-below-range.yaml", (("seed", 3),), "out of range"),
    Case("seed-above-range.jsonl", (("seed", 1),), "out of range"),
    Case("unknown-format.yaml", (("output_format", 6),), "must be one of"),
    Case("unknown-field.yaml", (("promt", 2), ("prompt", 1)), "did you mean 'prompt'"),
    Case("model-traversal.yaml", (("model", 1),), "model id"),
    # images
    Case("image-file-missing.csv", (("image", 3),), "does not exist"),
    Case(
        "unreadable-image.yaml",
        (("image", 1),),
        "cannot be read",
        make=_unreadable_image,
        unreadable=True,
    ),
    Case("not-an-image.yaml", (("image", 1),), "is not an image"),
    Case("too-big.yaml", (("image", 1),), "over the 20 MB limit", make=_big_image),
    Case("ftp-url.yaml", (("image", 1),), "unsupported URL scheme 'ftp'"),
    Case("file-url.jsonl", (("image", 1),), "unsupported URL scheme 'file'"),
    # ids
    Case("bad-id.yaml", (("id", 1),), "not a valid id"),
    Case("id-parent.yaml", (("id", 1),), "'../x' is not a valid id"),
    Case("id-absolute.jsonl", (("id", 1),), "'/etc/passwd' is not a valid id"),
    Case("id-hidden.csv", (("id", 2),), "'.hidden' is not a valid id"),
    Case("duplicate-ids.yaml", (("id", 8),), "duplicate id 'cat' (first at line 2)"),
    # CSV columns and expansion
    Case("csv-missing-columns.csv", (("prompt", 1),), "required column is missing"),
    Case("empty-prompts.yaml", (("prompts", 2),), "must not be an empty list"),
    Case("glob-nothing.yaml", (("images", 1),), "matches no files"),
    # several problems in one file: every one of them is reported
    Case(
        "several-problems.yaml",
        (
            ("defaults.output_format", 3),
            ("image", 6),
            ("seed", 11),
            ("id", 12),
            ("prompt", 12),
            ("image", 13),
            ("promt", 14),
        ),
        "unsupported URL scheme 'sftp'",
    ),
]


def _unreadable_is_enforced(folder: Path) -> bool:
    probe = folder / ".probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    enforced = not os.access(probe, os.R_OK)
    probe.chmod(0o600)
    probe.unlink()
    return enforced


@dataclass
class Outcome:
    manifest: Path
    out_dir: Path
    validate: subprocess.CompletedProcess[str]
    run: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the corpus with a valid image and the generated cases."""
    folder = tmp_path_factory.mktemp("validation") / "corpus"
    shutil.copytree(CORPUS, folder)
    make_image(folder / "images" / "ok.png")
    enforced = _unreadable_is_enforced(folder)
    for case in CASES:
        if case.make is not None and (enforced or not case.unreadable):
            case.make(folder)
    return folder


@pytest.fixture(scope="module")
def module_emulator() -> Iterator[Emulator]:
    """One emulator for the whole corpus: any request to it is a failure."""
    with serve_in_thread(EmulatorConfig(api_key=API_KEY, seed=1)) as emu:
        yield emu


def _wsbatch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # Module fixtures run before the autouse env fixture: pass the key explicitly.
    return run_subprocess(
        *[str(a) for a in args], WAVESPEED_API_KEY=API_KEY, WSBATCH_ZERO_BACKOFF="1"
    )


@pytest.fixture(scope="module")
def outcomes(corpus_dir: Path, module_emulator: Emulator) -> dict[str, Outcome]:
    """Run `validate` and `run` on every case as subprocesses, several at a time."""
    todo = [c for c in CASES if (corpus_dir / c.name).exists()]
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        jobs = {}
        for case in todo:
            manifest = corpus_dir / case.name
            out_dir = corpus_dir.parent / "out" / case.name
            validate = pool.submit(_wsbatch, "validate", manifest)
            run = pool.submit(
                _wsbatch,
                "run",
                manifest,
                "--base-url",
                module_emulator.base_url,
                "--out",
                out_dir,
                "--no-progress",
            )
            jobs[case.name] = (manifest, out_dir, validate, run)
        return {
            name: Outcome(manifest, out_dir, validate.result(), run.result())
            for name, (manifest, out_dir, validate, run) in jobs.items()
        }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_is_refused(
    case: Case, outcomes: dict[str, Outcome], module_emulator: Emulator
) -> None:
    """`validate` and `run` both exit 2, name FILE:LINE: field for each problem, no traceback."""
    if case.name not in outcomes:
        assert case.unreadable
        pytest.skip("chmod 000 does not stop this user from reading (running as root)")
    outcome = outcomes[case.name]
    for command, result in (("validate", outcome.validate), ("run", outcome.run)):
        streams = result.stdout + result.stderr
        assert result.returncode == 2, f"{command}: {streams}"
        assert "Traceback" not in streams, f"{command}: {streams}"
        assert "internal error" not in streams, f"{command}: {streams}"
        for field, line in case.expect:
            where = f"{outcome.manifest}:{line}" if line is not None else f"{outcome.manifest}"
            assert f"{where}: {field}: " in result.stderr, f"{command}: {result.stderr}"
        assert case.text in result.stderr, f"{command}: {result.stderr}"
    assert not (outcome.out_dir / "ledger.jsonl").exists()
    assert module_emulator.requests == []


def test_no_request_reached_the_emulator(
    outcomes: dict[str, Outcome], module_emulator: Emulator
) -> None:
    """After every broken manifest went through `run`, the API received nothing at all."""
    assert len(outcomes) >= 22
    assert module_emulator.requests == []
    assert not any(o.out_dir.exists() for o in outcomes.values())


def test_every_corpus_file_is_in_the_table() -> None:
    """A manifest added to tests/corpus without an expectation would go untested."""
    names = {c.name for c in CASES}
    on_disk = {p.name for p in CORPUS.iterdir() if p.is_file()}
    assert on_disk <= names, sorted(on_disk - names)
    generated = {c.name for c in CASES if c.make is not None}
    assert names - generated <= on_disk, sorted(names - generated - on_disk)


def test_run_with_bad_manifest_creates_no_ledger(
    cli, emulator: Emulator, images: list[Path], write_manifest: WriteManifest, tmp_path: Path
) -> None:
    """A refused manifest leaves the output folder untouched; fixing it lets the run start."""
    out = tmp_path / "out"
    rows = [
        {"id": "good", "image": "images/a.png", "prompt": "add snow"},
        {"id": "bad", "image": "images/missing.png", "prompt": "add rain", "seed": "x"},
    ]
    path = write_manifest(rows)
    result = cli("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress")
    assert result.code == 2
    assert f"{path}:5: image: " in result.err and f"{path}:7: seed: " in result.err
    assert not out.exists()
    assert emulator.requests == []

    # The same command with the manifest fixed does reach the emulator and write a ledger,
    # so the two checks above cannot pass merely because nothing was listening.
    write_manifest(rows[:1])
    result = cli("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress")
    assert result.code == 0, result.err
    assert (out / "ledger.jsonl").exists()
    assert emulator.requests
