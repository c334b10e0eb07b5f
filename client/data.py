"""A site's private data: read, validate, map labels, split into train and eval.

Accepted files: ``.csv`` (UTF-8, header row), ``.jsonl``/``.ndjson`` (one JSON object per
line), ``.parquet``. Every problem raises :class:`~fedlora.errors.DataError` naming the
file, and where it applies the row (1-based, header not counted), the column and the value.
Nothing is written here. A file's parsed contents are cached per process (keyed by the resolved
path, size, modification time, columns and label list), so the virtual sites of one cohort that
share a file read it once.

A data path ``generated:<kind>/<spec>`` names no file but a table a generator registered in this
process (``register_generator``) makes in memory when it is read: the simulation's synthetic demo
sites (``fedlora.simulation.demo_data``), whose rows are a pure function of (seed, cohort, site),
exist only while a site works. It is read and validated like a file, and never cached here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.errors import DataError
from fedlora.model import derive_seed
from fedlora.tasks.base import LabelledTexts

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
GENERATED = "generated:"  # a data path made in memory by a registered generator (``register_generator``), not a file
_GENERATORS: dict[str, Callable[[str], pd.DataFrame]] = {}


def register_generator(kind: str, make: Callable[[str], pd.DataFrame]) -> None:
    """Let the data path ``generated:<kind>/<spec>`` stand, in this process, for the table ``make(spec)``
    builds (columns as a file's would be); registering a kind again replaces its generator."""
    _GENERATORS[kind] = make


def _generated_table(path: str) -> pd.DataFrame:
    """The table a ``generated:`` data path names; DataError naming the path if no generator makes it."""
    kind, _, spec = path.removeprefix(GENERATED).partition("/")
    make = _GENERATORS.get(kind)
    if make is None:
        raise DataError(f"{path}: no generator for {kind!r} data in this process (known: {', '.join(sorted(_GENERATORS)) or 'none'})")
    try:
        df = make(spec)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot be generated: {e}") from None
    if len(df) == 0:
        raise DataError(f"{path}: the generator made no rows")
    return df


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file as strings-or-objects, with errors that name the file
    (or build the table a ``generated:`` path names)."""
    if str(path).startswith(GENERATED):
        return _generated_table(str(path))
    p = Path(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; use .csv, .jsonl or .parquet")
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")
    try:
        if kind == "csv":
            raw = p.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                raise DataError(f"{p}: not valid UTF-8 (byte {e.start}, line {line}: {e.reason}); re-encode the file as UTF-8") from None
            df = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")  # -sig: a BOM (Excel) is not part of a name
        elif kind == "jsonl":
            try:
                df = pd.read_json(p, lines=True, dtype=False, encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
        else:
            df = pd.read_parquet(p)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: the file has no header and no rows") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise DataError(f"{p}: cannot be parsed as {kind}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # pyarrow raises its own types for corrupt Parquet
        raise DataError(f"{p}: cannot be parsed as {kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if len(df) == 0:
        raise DataError(f"{p}: the file has a header but no rows")
    return df


def _column(df: pd.DataFrame, path: Path, name: str, role: str) -> pd.Series:
    if name not in df.columns:
        have = ", ".join(map(str, df.columns[:12]))
        raise DataError(f"{path}: no {role} column {name!r}; columns present: {have} (choose one with --{role}-column)")
    return df[name]


def _label_text(v: object) -> str | None:
    """A label cell as text: strings as they are, integral numbers without '.0'; None if missing."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return str(v).lower()
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


_CACHE_SIZE = 8
_CACHE: OrderedDict[tuple, tuple[LabelledTexts, tuple[str, ...]]] = OrderedDict()


def _file_key(p: Path) -> tuple | None:
    """(resolved path, size, mtime in ns) of an existing file; None if it cannot be stat'ed."""
    try:
        st = p.stat()
        return str(p.resolve()), st.st_size, st.st_mtime_ns
    except OSError:
        return None


def load_labelled_texts(path: str | Path, text_column: str, label_column: str, labels: Sequence[str] | None) -> tuple[LabelledTexts, list[str]]:
    """Load one file. With ``labels``, every label must be in that list (an error names the
    file, row and value); without, the list is the sorted distinct labels found.
    Returns the data and the label list used. Cached per process (the last 8 files and
    column/label choices; a changed file has another size or mtime and is read again); the
    returned labels array is read-only, ``subset`` copies."""
    p = Path(path)
    fk = None if str(path).startswith(GENERATED) else _file_key(p)
    key = None if fk is None else (*fk, text_column, label_column, tuple(labels) if labels else None)
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        data, label_list = _CACHE[key]
        return data, list(label_list)
    data, found = _load_labelled_texts(p, text_column, label_column, labels)
    data.labels.flags.writeable = False
    if key is not None:
        _CACHE[key] = (data, tuple(found))
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return data, found


def read_group_column(path: str | Path, column: str) -> list[str]:
    """The values of ``column`` (one per data row, as text) that name each row's natural site
    (``partition.by``); an error names the file, and a missing value its row."""
    p = Path(path)
    df = read_table(p)
    if column not in df.columns:
        have = ", ".join(map(str, df.columns[:12]))
        raise DataError(f"{p}: no column {column!r} to partition by (partition.by); columns present: {have}")
    values = [_label_text(v) for v in df[column].tolist()]
    for i, v in enumerate(values):
        if v is None or v == "":
            raise DataError(f"{p}: row {i + 1}, column {column!r}: missing value; partition.by needs one for every row")
    return values  # type: ignore[return-value]


def _load_labelled_texts(p: Path, text_column: str, label_column: str, labels: Sequence[str] | None) -> tuple[LabelledTexts, list[str]]:
    df = read_table(p)
    texts_col = _column(df, p, text_column, "text")
    labels_col = _column(df, p, label_column, "label")
    texts: list[str] = []
    for i, v in enumerate(texts_col.tolist()):
        if not isinstance(v, str):
            raise DataError(f"{p}: row {i + 1}, column {text_column!r}: expected text, found {type(v).__name__} {v!r}")
        if not v.strip():
            raise DataError(f"{p}: row {i + 1}, column {text_column!r}: empty text")
        texts.append(v)
    raw = [_label_text(v) for v in labels_col.tolist()]
    for i, v in enumerate(raw):
        if v is None or v == "":
            raise DataError(f"{p}: row {i + 1}, column {label_column!r}: missing label")
    label_list = list(labels) if labels else sorted(set(raw))  # type: ignore[arg-type]
    if len(label_list) < 2:
        raise DataError(f"{p}: column {label_column!r} has only the label {label_list}; a classifier needs at least two")
    index = {lab: j for j, lab in enumerate(label_list)}
    ids = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        if v not in index:
            shown = ", ".join(label_list[:10]) + (", ..." if len(label_list) > 10 else "")
            raise DataError(f"{p}: row {i + 1}, column {label_column!r}: label {v!r} is not in the cohort's labels [{shown}]")
        ids[i] = index[v]  # type: ignore[index]
    return LabelledTexts(tuple(texts), ids), label_list


def split_train_eval(data: LabelledTexts, eval_fraction: float, seed: int, key: str) -> tuple[LabelledTexts, LabelledTexts]:
    """A deterministic split: a seeded permutation, the first ceil(f * n) rows (at least 1) for eval."""
    n = len(data)
    if n < 2:
        raise DataError(f"{key}: {n} example(s); a site needs at least 2 (one to train, one to evaluate)")
    n_eval = min(n - 1, max(1, int(np.ceil(eval_fraction * n))))
    perm = np.random.default_rng(derive_seed(seed, "split", key)).permutation(n)
    return data.subset(np.sort(perm[n_eval:])), data.subset(np.sort(perm[:n_eval]))
