"""Reading raw rows from local files or the Hugging Face hub; no task logic.

A row is ``(where, fields)``: ``where`` says where it came from (``/data/train.jsonl:17``,
``/data/valid.json[3]``, ``openai/gsm8k[train][5]``) so that every :class:`DataError` raised while
parsing it can name the file, the line (1-based) or row index, and the field. Files are parsed
once per process (keyed by path and modification time), because tasks re-read the same file for
several splits and tests build many tasks.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from latentreason.data.base import ANSWER_DELIMITER, DataError

Row = tuple[str, dict[str, Any]]
T = TypeVar("T")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILE_SUFFIX = re.compile(r"\.(?:jsonl?|txt|csv|tsv|parquet)$", re.I)  # "data/trian.jsonl" is a typo, not a hub dataset
_MEMO: dict[tuple, Any] = {}


def memo(key: tuple, make: Callable[[], T]) -> T:
    """Process-wide cache for parsed files and generated splits (small: a few entries per task)."""
    if key not in _MEMO:
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = make()
    return _MEMO[key]


def locate(path: str | Path | None, default: Path, filename: str) -> Path | str:
    """The file to read: ``path`` itself, ``path/filename``, or (when ``path`` is not local and
    looks like ``owner/name``) the hub dataset name, returned as a ``str``."""
    target = Path(path) if path is not None else default
    if target.is_dir():
        target = target / filename
    if target.is_file():
        return target
    if path is not None and not Path(path).exists() and HUB_NAME.fullmatch(str(path)) and not FILE_SUFFIX.search(str(path)):
        return str(path)
    raise DataError(f"{target}: no such file (expected {filename}, a folder holding it, or a hub name owner/name)")


def field(row: Row, name: str, kind: type = str, empty_ok: bool = False) -> Any:
    """``row[name]``, checked to be a ``kind`` (a non-empty one for ``str``/``list``, unless ``empty_ok``)."""
    where, data = row
    if name not in data:
        raise DataError(f"{where}: field {name!r} is missing (fields: {', '.join(data) or 'none'})")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r:.80}")
    if kind in (str, list) and not empty_ok and not (value.strip() if kind is str else value):
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def read_rows(source: Path | str, fmt: str, hub_split: str = "train", hub_config: str | None = None) -> list[Row]:
    """Rows of a ``jsonl``, ``json`` (a list of objects) or ``pipes`` file, or of a hub split."""
    if isinstance(source, str):
        key = (*source_key(source), hub_split, hub_config)
        return memo(key, lambda: _read_hub(source, hub_split, hub_config, fmt))
    return memo((*source_key(source), fmt), lambda: _READERS[fmt](source))


def source_key(source: Path | str) -> tuple:
    """Identifies a file's current contents (path and mtime) or a hub name, for caching."""
    if isinstance(source, str):
        return ("hub", source)
    return ("file", str(source.resolve()), source.stat().st_mtime_ns)


def _text(file: Path) -> str:
    """The file as text: UTF-8, with a byte-order mark (Windows tools write one) accepted; other
    bytes are an error naming the file and where, not a bare UnicodeDecodeError."""
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = file.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _lines(file: Path) -> list[str]:
    """The file's lines, split at newlines only: ``str.splitlines`` also splits at U+2028, U+2029,
    U+0085 and form feeds, which JSON strings and questions may hold unescaped."""
    return [line.removesuffix("\r") for line in _text(file).split("\n")]


def _no_rows(file: Path) -> DataError:
    return DataError(f"{file}: no rows (an empty or truncated file?)")


def _read_jsonl(file: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(_lines(file), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(data, dict):
            raise DataError(f"{file}:{n}: expected a JSON object, got {type(data).__name__}")
        rows.append((f"{file}:{n}", data))
    if not rows:
        raise _no_rows(file)
    return rows


def _read_json(file: Path) -> list[Row]:
    try:
        data = json.loads(_text(file))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{file}[{i}]: expected a JSON object, got {type(item).__name__}")
    if not data:
        raise _no_rows(file)
    return [(f"{file}[{i}]", item) for i, item in enumerate(data)]


def split_pipes(where: str, line: str) -> dict[str, str]:
    """``question||chain #### answer`` (the iCoT text format) -> its three fields."""
    question, sep, rest = line.partition("||")
    if not sep:
        raise DataError(f"{where}: field 'question' is not followed by '||' (expected 'question||chain #### answer')")
    chain, sep, answer = rest.rpartition(ANSWER_DELIMITER)
    if not sep:
        raise DataError(f"{where}: field 'answer' has no '{ANSWER_DELIMITER} ' marker")
    return {"question": question.strip(), "chain": chain.strip(), "answer": answer.strip()}


def _read_pipes(file: Path) -> list[Row]:
    rows = [(f"{file}:{n}", split_pipes(f"{file}:{n}", line)) for n, line in enumerate(_lines(file), 1) if line.strip()]
    if not rows:
        raise _no_rows(file)
    return rows


_READERS: dict[str, Callable[[Path], list[Row]]] = {"jsonl": _read_jsonl, "json": _read_json, "pipes": _read_pipes}


def _read_hub(name: str, split: str, config: str | None, fmt: str) -> list[Row]:
    """A hub split as rows; imported lazily so ``datasets`` stays an optional dependency."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            f"{name!r} is not a local file or folder; loading it from the Hugging Face hub needs the "
            "'datasets' package: pip install datasets"
        ) from exc
    rows = []
    for i, item in enumerate(datasets.load_dataset(name, config, split=split)):
        data = dict(item)
        if fmt == "pipes" and "chain" not in data and "cot" in data:  # e.g. whynlp/gsm8k-aug
            data["chain"] = data.pop("cot")
        rows.append((f"{name}[{split}][{i}]", data))
    return rows
