"""Reading sources into (locator, record) pairs, and the per-source ``fraction`` draw.

A locator says where a record came from ("line 12" in a .jsonl/.csv, "index 3" in a .json list,
a parquet file or an HF dataset). A .jsonl line that is not valid JSON is still a record: it is
read as a ``RecordError`` and ends up in rejects.jsonl, so accepted + rejected = read.

Text is UTF-8. Bytes that are not (a binary file, a Latin-1 export) make their record a
``RecordError("invalid_utf8")``, never U+FFFD characters to train on: .jsonl lines are kept as bytes
and decoded one by one; .json and .csv files are decoded with ``surrogateescape``, which turns each
bad byte into a lone surrogate that the record check finds (as it finds the ``\\udc80``-style JSON
escapes that no UTF-8 text can hold). A UTF-8 byte order mark at the start of a file is skipped.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from data_prep.config import SourceConfig
from data_prep.formats import RecordError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# CSV cells are strings; these columns hold message lists written as JSON.
_JSON_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt")
# Lone surrogates: what surrogateescape makes of a byte that is not UTF-8, and what a JSON
# "\\ud800" escape without its pair decodes to. Neither encodes back to UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class RawSource:
    """The rows of one source before the fraction draw; ``rows[i]`` is unparsed for .jsonl."""

    config: SourceConfig
    locators: list[str]
    rows: list
    content_hash: str
    parse_jsonl: bool = False

    def record(self, i: int):
        """Row ``i`` as a Python object, or the RecordError that explains why it is not one."""
        row = self.rows[i]
        if isinstance(row, RecordError):
            return row
        if self.parse_jsonl:
            try:
                row = row.decode("utf-8")
            except UnicodeDecodeError as err:
                return RecordError(
                    "invalid_utf8", f"byte 0x{row[err.start]:02x} at byte {err.start + 1} of the line is not UTF-8"
                )
            try:
                row = json.loads(row)
            except json.JSONDecodeError as err:
                return RecordError("malformed_json", f"invalid JSON at column {err.colno}: {err.msg}")
        where = _invalid_text(row)
        if where is not None:
            return RecordError("invalid_utf8", f"{where} holds bytes or escapes that are not UTF-8 text")
        return row


def _invalid_text(value, where: str = "the record") -> str | None:
    """Where in a parsed record a string holds a lone surrogate (None: all of it is UTF-8 text)."""
    if isinstance(value, str):
        return where if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return f"a key of {where}"
        found = _invalid_text(item, f"{where}[{key!r}]" if where != "the record" else repr(key))
        if found is not None:
            return found
    return None


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(config: SourceConfig) -> RawSource:
    """All rows of a source (parsing of .jsonl lines deferred to the draw)."""
    if config.hf is not None:
        return _read_hf(config)
    path = Path(config.path)
    if not path.is_file():
        raise FileNotFoundError(f"data.sources: {path} does not exist")
    suffix = path.suffix.lower()
    digest = file_hash(path)
    if suffix == ".jsonl":
        locators, rows = [], []
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, start=1):
                if number == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                if line.decode("utf-8", "replace").strip():  # blank lines hold no record
                    locators.append(f"line {number}")
                    rows.append(line)
        return RawSource(config, locators, rows, digest, parse_jsonl=True)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); a .json source must be one JSON list "
                "of records (use .jsonl for one record per line)"
            ) from err
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} style wrappers
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json source must hold a list of records, got {type(data).__name__}")
        return RawSource(config, [f"index {i}" for i in range(len(data))], data, digest)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return RawSource(config, [f"row {i}" for i in range(len(rows))], rows, digest)
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.DictReader(fh)
            rows, locators = [], []
            for row in reader:
                locators.append(f"line {reader.line_num}")
                rows.append(_csv_row(row))
        return RawSource(config, locators, rows, digest)
    raise ValueError(f"data.sources: {path} has an unsupported suffix {suffix!r} (supported: {', '.join(SUFFIXES)})")


def _csv_row(row: dict) -> dict | RecordError:
    out = {}
    for key, value in row.items():
        if key is None:
            return RecordError("invalid_structure", "the row has more cells than the header")
        if value == "":
            continue  # an empty cell is a missing field
        if key in _JSON_COLUMNS and isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                return RecordError("malformed_json", f"column {key}: invalid JSON at column {err.colno}: {err.msg}")
        out[key] = value
    return out


def _read_hf(config: SourceConfig) -> RawSource:
    import datasets

    try:
        ds = datasets.load_dataset(config.hf, name=config.subset, split=config.split, revision=config.revision)
    except Exception as err:  # datasets raises many types (FileNotFound, ConnectionError, ValueError ...)
        raise ValueError(f"data.sources: cannot load HF dataset {config.name}: {type(err).__name__}: {err}") from err
    rows = ds.to_list()
    return RawSource(config, [f"index {i}" for i in range(len(rows))], rows, f"hf-fingerprint:{ds._fingerprint}")


def draw(raw: RawSource, seed: int) -> list[int]:
    """Row indices this run uses: all of them, or a seeded ``fraction`` of them (in file order)."""
    n = len(raw.rows)
    if raw.config.fraction >= 1.0:
        return list(range(n))
    k = round(raw.config.fraction * n)
    rng = random.Random(f"{seed}:{raw.config.name}")
    return sorted(rng.sample(range(n), k))
