"""Broken manifests are refused whole by `validate` and `run`, located, and send nothing.

Every case in ``CASES`` is a file under ``tests/corpus/`` or is made in a temporary
copy of it (binary, non-UTF-8, unreadable and oversized inputs). Each one goes
through both commands as a real subprocess against a live emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from batch.emulator import Emulator, EmulatorConfig, serve_in_thread
from tests.conftest import API_KEY, WriteManifest, make_image, subprocess_env, wsbatch_cmd

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


def _huge_manifest(folder: Path) -> None:
    """A sparse 257 MB CSV: refused by its size before a byte of it is read."""
    with open(folder / "manifest-too-big.csv", "wb") as fh:
        fh.write(b"image,prompt\n")
        fh.truncate(257 * 1024 * 1024)


def _fifo_manifest(folder: Path) -> None:
    """A named pipe that nothing writes to: reading it would wait for ever."""
    os.mkfifo(folder / "manifest-fifo.yaml")


def _params_too_big(folder: Path) -> None:
    row = b'{"image": "images/ok.png", "prompt": "x", "params": {"negative_prompt": "'
    (folder / "params-too-big.jsonl").write_bytes(row + b"a" * 70_000 + b'"}}\n')


def _image_symlink_loop(folder: Path) -> None:
    (folder / "image-symlink-loop.yaml").write_text(
        "- image: images/ok.png\n  prompt: x\n- image: images/loop.png\n  prompt: y\n"
    )
    (folder / "images" / "loop.png").symlink_to("loop.png")


def _loops(folder: Path) -> Path:
    """Two loops in a folder and a link to it: glob's `**` walked 2^40 paths through them."""
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "up").symlink_to("..")
    (folder / "a" / "self").symlink_to(".")
    (folder / "b").symlink_to("a")
    return folder


def _glob_only_loops(folder: Path) -> None:
    _loops(folder / "loops-empty")
    (folder / "glob-only-loops.yaml").write_text("- images: loops-empty/**/*.png\n  prompt: x\n")


def _glob_loop_and_bad_row(folder: Path) -> None:
    """A loop under `**` next to a real problem: the problem is still found, and fast."""
    make_image(_loops(folder / "loops-one") / "a" / "one.png")
    (folder / "glob-loop-and-bad-row.yaml").write_text(
        "- images: loops-one/**/*.png\n  prompt: x\n- image: images/ok.png\n  prompt: ''\n"
    )


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
    # resource bombs: refused at once, whatever they would expand to
    Case("alias-bomb-seed.yaml", (("yaml", 8),), "aliases expand to over 64 MB"),
    Case("alias-bomb-params.yaml", (("yaml", 8),), "aliases expand to over 64 MB"),
    Case("alias-bomb-format.yaml", (("yaml", 8),), "aliases expand to over 64 MB"),
    Case("alias-bomb-merge.yaml", (("yaml", 8),), "aliases expand to over 64 MB"),
    Case("expansion-product.yaml", (("rows", 1),), "limit of 1,000,000 rows"),
    Case("expansion-across-rows.yaml", (("rows", 5),), "limit of 1,000,000 rows"),
    Case("nested-too-deep.yaml", (("yaml", 3),), "over 20 levels deep"),
    Case("params-too-big.jsonl", (("params", 1),), "over 64 KB", make=_params_too_big),
    Case(
        "manifest-too-big.csv", (("manifest", None),), "over the 256 MB limit", make=_huge_manifest
    ),
    # text that cannot be sent: refused before it is billed
    Case("surrogate-prompt.jsonl", (("prompt", 2),), "lone surrogate"),
    Case("surrogate-meta.yaml", (("meta.label", 3),), "lone surrogate"),
    Case("nan-params.jsonl", (("json", 1),), "NaN is not valid JSON"),
    Case("nan-params.csv", (("params.guidance_scale", 3),), "nan is not a finite number"),
    Case("duplicate-key.jsonl", (("prompt", 1),), "appears twice"),
    # files that lie about what they are
    Case("manifest-fifo.yaml", (("manifest", None),), "not a regular file", make=_fifo_manifest),
    Case("image-symlink-loop.yaml", (("image", 3),), "cannot be", make=_image_symlink_loop),
    Case("glob-only-loops.yaml", (("images", 1),), "matches no files", make=_glob_only_loops),
    Case(
        "glob-loop-and-bad-row.yaml",
        (("prompt", 4),),
        "must not be empty",
        make=_glob_loop_and_bad_row,
    ),
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
class Measured:
    result: subprocess.CompletedProcess[str]
    cpu: float  # seconds of CPU the child used
    max_rss_mb: float  # its peak resident memory


@dataclass
class Outcome:
    manifest: Path
    out_dir: Path
    validate: Measured
    run: Measured


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


def _wsbatch(*args: str | Path) -> Measured:
    """Run wsbatch as a child and measure it: reaped with wait4 for its own rusage."""
    # Module fixtures run before the autouse env fixture: pass the key explicitly.
    env = subprocess_env(WAVESPEED_API_KEY=API_KEY, WSBATCH_ZERO_BACKOFF="1")
    cmd = wsbatch_cmd(*[str(a) for a in args])
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        usage_file = Path(handle.name)
    # Through a small launcher: a child forked from this (possibly large) test worker
    # would report the worker's peak RSS as its own.
    launch = [sys.executable, str(Path(__file__).with_name("launch.py")), str(usage_file), *cmd]
    proc = subprocess.Popen(
        launch,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    streams: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda n=n, f=f: streams.__setitem__(n, f.read()))
        for n, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    timer = threading.Timer(60, proc.kill)
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    for reader in readers:
        reader.join()
    proc.stdout.close()
    proc.stderr.close()
    out, err = (streams[n].decode(errors="replace") for n in ("out", "err"))
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    usage = json.loads(usage_file.read_text())
    usage_file.unlink()
    # ru_maxrss is in kilobytes on Linux
    return Measured(result, usage["cpu_s"], usage["maxrss_kb"] / 1024)


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
    for command, measured in (("validate", outcome.validate), ("run", outcome.run)):
        result = measured.result
        streams = result.stdout + result.stderr
        assert result.returncode == 2, f"{command}: {streams}"
        assert "Traceback" not in streams, f"{command}: {streams}"
        assert "internal error" not in streams, f"{command}: {streams}"
        for field, line in case.expect:
            where = f"{outcome.manifest}:{line}" if line is not None else f"{outcome.manifest}"
            assert f"{where}: {field}: " in result.stderr, f"{command}: {result.stderr}"
        assert case.text in result.stderr, f"{command}: {result.stderr}"
        # Bombs included: refused in well under a second of CPU, in under 200 MB.
        assert measured.cpu < 1.0, f"{command}: {measured.cpu:.2f} s of CPU"
        assert measured.max_rss_mb < 200, f"{command}: {measured.max_rss_mb:.0f} MB"
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
