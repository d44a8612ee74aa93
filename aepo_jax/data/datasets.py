"""Problem files as RL users already have them: JSONL / JSON / Parquet, verl and EasyR1 layouts.

A row becomes a :class:`Problem` (a prompt, a ground-truth answer, where it came from). Field
names are dotted paths into the row, so verl's nested ``reward_model.ground_truth`` works as
``answer_key="reward_model.ground_truth"``. With ``"auto"`` (the default) the first of the usual
names present in the file's first row is used (:data:`PROMPT_KEYS`, :data:`ANSWER_KEYS`), and
the choice is fixed for the whole file, so a row that lacks it is a bad row, not a silent switch.

Answers are reduced to the bare final answer: GSM8K's ``"... #### 72"`` gives ``"72"``, a
MATH-style solution gives the content of its last ``\\boxed{}``, a list (OlympiadBench's
``final_answer``) gives its items joined by ``", "``, and ``142.0`` gives ``"142"``.

A bad row (unreadable line, missing field, wrong type, empty prompt or answer) raises
:class:`DataError` naming the file, the row and the field, or with ``skip_bad_rows=True`` is
skipped and counted in :class:`LoadStats` (and logged once per file with the first reason).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aepo_jax.rewards.math import extract_boxed

logger = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "problem", "question", "Problem", "Question", "query", "input")
ANSWER_KEYS = (
    "reward_model.ground_truth",
    "answer",
    "ground_truth",
    "final_answer",
    "Answer",
    "target",
    "solution",
)
SOURCE_KEYS = ("data_source", "source", "dataset")


class DataError(ValueError):
    """A problem file or row that cannot be used; the message names file, row and field."""


@dataclass
class DatasetConfig:
    """How to read problem files."""

    prompt_key: str = "auto"  # dotted path, or "auto" = first of PROMPT_KEYS in the first row
    answer_key: str = "auto"  # dotted path, or "auto" = first of ANSWER_KEYS in the first row
    skip_bad_rows: bool = False  # False: raise DataError on the first bad row
    max_rows: int = 0  # 0 = all rows of each file


@dataclass(frozen=True)
class Problem:
    """One prompt with its ground truth."""

    prompt: str | tuple[tuple[tuple[str, str], ...], ...]  # text, or chat messages as (key, value) pairs
    answer: str
    source: str  # data_source field, else the file's stem
    uid: str  # "<file name>:<row>" -- stable across runs, used as the GRPO group id

    @property
    def messages(self) -> list[dict[str, str]] | None:
        """The chat messages of a verl-style prompt, or None for a text prompt."""
        if isinstance(self.prompt, str):
            return None
        return [dict(m) for m in self.prompt]


@dataclass
class LoadStats:
    rows: int = 0
    loaded: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)


# --- reading files -------------------------------------------------------------------------------


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict | Exception]]:
    """``(row number, row dict)`` for every row; a row that cannot be decoded yields its exception
    (so the caller decides between failing and skipping). Rows count from 0."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    try:
        yield from _iter_file_rows(p)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded); "
                        "save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror or e}") from None


def _iter_file_rows(p: Path) -> Iterator[tuple[int, dict | Exception]]:
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types
            raise DataError(f"{p}: cannot read parquet: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield i, row
    elif suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            row_no = 0
            for line in f:
                if not line.strip():
                    continue  # blank lines carry no row (a trailing newline is common)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield row_no, DataError(f"invalid JSON ({e.msg} at column {e.colno})")
                else:
                    yield row_no, obj
                row_no += 1
    elif suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]} style wrappers
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{p}: expected a JSON list of rows (or an object holding exactly one list)")
            obj = lists[0]
        if not isinstance(obj, list):
            raise DataError(f"{p}: expected a JSON list of rows, got {type(obj).__name__}")
        yield from enumerate(obj)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def get_field(row: dict, key: str) -> Any:
    """Value at a dotted path (``"reward_model.ground_truth"``); KeyError naming the missing part."""
    if key in row:  # a flat key that itself contains dots wins
        return row[key]
    obj: Any = row
    for part in key.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise KeyError(part)
    return obj


def has_field(row: dict, key: str) -> bool:
    try:
        get_field(row, key)
    except KeyError:
        return False
    return True


def resolve_key(row: dict, key: str, candidates: Sequence[str], what: str, path: Path) -> str:
    if key != "auto":
        return key
    for k in candidates:
        if has_field(row, k):
            return k
    raise DataError(
        f"{path}: no {what} field found in row 0 (tried {list(candidates)}; row has {sorted(row)}); "
        f"set {what}_key to the field name (dotted for nested fields)"
    )


# --- turning values into prompts and answers -----------------------------------------------------


def clean_answer(value: Any) -> str:
    """Bare final answer from the forms datasets store it in; ValueError on an unusable value."""
    if value is None:
        raise ValueError("is null")
    if isinstance(value, bool):
        raise ValueError("is a boolean")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"is {value}")
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("is an empty list")
        return ", ".join(clean_answer(v) for v in value)
    if not isinstance(value, str):
        raise ValueError(f"has type {type(value).__name__}, expected a string, number or list")
    text = value.strip()
    if "####" in text:  # GSM8K: reasoning, then "#### 72"
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = extract_boxed(text)
    if boxed is not None:  # a whole solution, or "$\boxed{5}$"
        text = boxed
    text = text.strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    if not text:
        raise ValueError("is empty")
    return text


def clean_prompt(value: Any) -> str | tuple[tuple[tuple[str, str], ...], ...]:
    """A non-empty string, or a non-empty list of ``{"role", "content"}`` chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("is empty")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("is an empty message list")
        msgs = []
        for j, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {j} is not a {{'role': str, 'content': str}} mapping")
            msgs.append((("role", m["role"]), ("content", m["content"])))
        if not any(dict(m)["content"].strip() for m in msgs):
            raise ValueError("has only empty messages")
        return tuple(msgs)
    raise ValueError(f"has type {type(value).__name__}, expected a string or a list of chat messages")


def problem_from_row(row: Any, prompt_key: str, answer_key: str, source: str, uid: str) -> Problem:
    """One row -> Problem; ValueError("field 'x' ...") on a bad row."""
    if not isinstance(row, dict):
        raise ValueError(f"row is {type(row).__name__}, expected an object")
    values = {}
    for key, clean in ((prompt_key, clean_prompt), (answer_key, clean_answer)):
        try:
            raw = get_field(row, key)
        except KeyError as e:
            raise ValueError(f"field {key!r} is missing (no {e.args[0]!r})") from None
        try:
            values[key] = clean(raw)
        except ValueError as e:
            raise ValueError(f"field {key!r} {e}") from None
    src = source
    for k in SOURCE_KEYS:
        if isinstance(row.get(k), str) and row[k]:
            src = row[k]
            break
    return Problem(prompt=values[prompt_key], answer=values[answer_key], source=src, uid=uid)


def load_problems(paths: str | Path | Sequence[str | Path], cfg: DatasetConfig = DatasetConfig()) -> tuple[list[Problem], LoadStats]:
    """All problems of ``paths`` (a path, a comma-separated string of paths, or a list)."""
    if isinstance(paths, (str, Path)):
        paths = [s for s in str(paths).split(",") if s.strip()]
    if not paths:
        raise DataError("no data files given")
    problems: list[Problem] = []
    stats = LoadStats()
    for path in map(Path, paths):
        prompt_key = answer_key = None
        first_reason = None
        file_skipped = 0
        rows_before = stats.rows
        for i, row in iter_rows(path):
            if cfg.max_rows and i >= cfg.max_rows:
                break
            stats.rows += 1
            try:
                if isinstance(row, Exception):
                    raise ValueError(str(row))
                if prompt_key is None:
                    if not isinstance(row, dict):
                        raise ValueError(f"row is {type(row).__name__}, expected an object")
                    prompt_key = resolve_key(row, cfg.prompt_key, PROMPT_KEYS, "prompt", path)
                    answer_key = resolve_key(row, cfg.answer_key, ANSWER_KEYS, "answer", path)
                problems.append(problem_from_row(row, prompt_key, answer_key, path.stem, f"{path.name}:{i}"))
                stats.loaded += 1
            except DataError:
                raise  # file-level: no usable field name, nothing to skip
            except ValueError as e:
                if not cfg.skip_bad_rows:
                    raise DataError(f"{path} row {i}: {e}") from None
                stats.skipped += 1
                file_skipped += 1
                stats.reasons[str(e).split(" (")[0][:80]] += 1
                first_reason = first_reason or f"row {i}: {e}"
        if stats.rows == rows_before:
            raise DataError(f"{path}: no rows (the file is empty)")
        if file_skipped:
            logger.warning("%s: skipped %d bad rows (first: %s)", path, file_skipped, first_reason)
    return problems, stats
