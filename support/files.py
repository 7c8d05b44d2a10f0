"""Reading and writing files, with errors that name the file (and line). It imports nothing of the project.

Every reader opens its files through `lines` / `read_json` / `jsonl`, so a missing file, a directory, a file that is
not UTF-8 or a `.gz` that is not gzip all end in one `DataError` that names the file, never a traceback. Outputs are
written with `atomic_write` (a temporary file, then a rename), so a run killed mid-write leaves the old file whole.
"""

from __future__ import annotations

import gzip
import json
import re
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


class DataError(ValueError):
    """Bad or missing input. The message names the file (and line) and says what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# reading


def check_file(path: str | Path) -> Path:
    """`path` as a Path, if it is a readable file; else a DataError that says what it is instead."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied (not readable)")
    return path


@contextmanager
def open_bytes(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a file for reading as bytes, gunzipping `.gz`; a `.gz` that is not gzip (or is cut short) is a DataError
    naming the file. Reading happens inside the `with` block, so the errors that only show while reading are caught."""
    path = check_file(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        with f:
            yield f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); a .gz name needs gzip content") from None


def decode(path: str | Path, raw: bytes, lineno: int) -> str:
    r"""UTF-8 bytes of line `lineno` (1-based) as text; anything else is an error at that file:line.

    >>> decode("f.txt", "café".encode(), 3)
    'café'
    >>> decode("f.txt", b"caf\xe9", 3)  # café in Latin-1
    Traceback (most recent call last):
    support.files.DataError: f.txt:3: not UTF-8 text (byte b'\xe9' at column 4); is it the right file?
    """
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not part of the text
    except UnicodeDecodeError as e:
        lineno += raw.count(b"\n", 0, e.start)  # raw may hold several lines (a whole JSON file)
        start = raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                        f"{e.start - start + 1}); is it the right file?") from None


def lines(path: str | Path) -> Iterator[tuple[int, str]]:
    r"""(1-based line number, stripped line) for every non-blank line of a text file (UTF-8, `.gz` gunzipped).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "t.txt"; _ = p.write_text("a\n\n b \n")
    >>> list(lines(p))
    [(1, 'a'), (3, 'b')]
    """
    with open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):  # decoded line by line, so a bad byte is reported at its own line
            line = decode(path, raw, lineno).strip()
            if line:
                yield lineno, line


def read_json(path: str | Path) -> Any:
    """A whole JSON file (`.json` or `.json.gz`); invalid JSON is an error at its file:line."""
    with open_bytes(path) as f:
        text = decode(path, f.read(), 1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file; each line must be a JSON object."""
    for lineno, line in lines(path):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg}, column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(value).__name__}")
        yield lineno, value


# ----------------------------------------------------------------------------------------------------------------------
# writing


def check_out_dir(path: str | Path, create: bool = True) -> Path:
    """An output directory, created if missing (unless not `create`); a file in its place is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {path}: is a file, not a directory; give a directory")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {path}: cannot create the directory ({e.strerror or e})") from None
    return path


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write `path` through a temporary file beside it, renamed over `path` only once the block finished.

    A crash (or kill -9) mid-write leaves the old file whole and at most a stray `.tmp` file.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_write(p) as f: _ = f.write("whole")
    >>> p.read_text(), [q.name for q in p.parent.iterdir()]
    ('whole', ['out.txt'])
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; cannot write a file there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path.parent}: cannot create the directory ({e.strerror or e})") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, atomically."""
    with atomic_write(path) as f:
        f.write(text)


def names_a_file(spec: str) -> bool:
    """Whether --eval-qids `spec` is a file rather than qids: it exists, or it looks like a path (a '/' or a
    file-name suffix such as .txt, .tsv, .qids), so a mistyped file is an error, not a query id.

    >>> [names_a_file(s) for s in ("1037798,104861", "q1", "splits/val", "missing.txt")]
    [False, False, True, True]
    """
    return Path(spec).exists() or "/" in spec or re.search(r"\.[A-Za-z]\w*$", spec) is not None


def read_qids(spec: str) -> set[str]:
    """Qids from a comma-separated list or from a file with one qid a line (blank lines skipped)."""
    if names_a_file(spec):
        qids = {line for _, line in lines(check_file(spec))}
    else:
        qids = {q.strip() for q in spec.split(",") if q.strip()}
    if not qids:
        raise DataError(f"{spec}: no query ids in it")
    return qids
