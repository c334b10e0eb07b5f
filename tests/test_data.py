"""Data loading at a site: a corpus of broken files, each with an error that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedlora.client.data import load_labelled_texts, shard, split_train_eval
from fedlora.errors import DataError

LABELS = ["neg", "pos"]


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.csv", b"", r"empty\.csv: the file is empty"),
        ("header_only.csv", "text,label\n", r"header_only\.csv: the file has a header but no rows"),
        ("no_label.csv", "text,score\nhello,1\n", r"no_label\.csv: no label column 'label'; columns present: text, score"),
        ("no_text.csv", "body,label\nhello,pos\n", r"no text column 'text'"),
        ("bad_label.csv", "text,label\nfine,pos\nawful,terrible\n", r"bad_label\.csv: row 2, column 'label': label 'terrible' is not in the cohort's labels \[neg, pos\]"),
        ("empty_text.csv", 'text,label\n"   ",pos\n', r"row 1, column 'text': empty text"),
        ("missing_label.csv", "text,label\nhello,\n", r"row 1, column 'label': missing label"),
        ("latin1.csv", "text,label\ncaf\xe9,pos\n".encode("latin-1"), r"latin1\.csv: not valid UTF-8 \(byte 14, line 2"),
        ("ragged.csv", 'text,label\n"unterminated,pos\n', r"ragged\.csv: cannot be parsed as csv"),
        ("numbers.jsonl", '{"text": 42, "label": "pos"}\n', r"numbers\.jsonl: row 1, column 'text': expected text, found int 42"),
        ("broken.jsonl", '{"text": "a", "label": "pos"}\n{not json\n', r"broken\.jsonl: cannot be parsed as jsonl"),
        ("corrupt.parquet", b"PAR1 this is not parquet", r"corrupt\.parquet: cannot be parsed as parquet"),
        ("data.xlsx", b"whatever", r"unsupported file type '\.xlsx'"),
    ],
)
def test_broken_files_get_errors_that_name_the_problem(tmp_path: Path, name: str, content: str | bytes, pattern: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=pattern):
        load_labelled_texts(path, "text", "label", LABELS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_labelled_texts(tmp_path / "gone.csv", "text", "label", LABELS)


def test_csv_jsonl_and_parquet_load_the_same(tmp_path: Path) -> None:
    df = pd.DataFrame({"body": ["good day", "bad day", "fine", "meh, ok"], "stars": [5, 1, 4, 2]})
    df.to_csv(tmp_path / "d.csv", index=False)
    with open(tmp_path / "d.jsonl", "w") as f:
        for row in df.to_dict("records"):
            f.write(json.dumps(row) + "\n")
    df.to_parquet(tmp_path / "d.parquet")
    loaded = [load_labelled_texts(tmp_path / n, "body", "stars", None) for n in ("d.csv", "d.jsonl", "d.parquet")]
    for data, labels in loaded:
        assert labels == ["1", "2", "4", "5"], "integer labels read as text, without '.0'"
        assert data.texts == loaded[0][0].texts
        assert data.labels.tolist() == [3, 0, 2, 1]


def test_csv_with_a_byte_order_mark_and_crlf_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "excel.csv", "\ufefftext,label\r\nsehr gut,pos\r\nschlecht,neg\r\n")
    data, labels = load_labelled_texts(path, "text", "label", None)
    assert data.texts == ("sehr gut", "schlecht") and labels == ["neg", "pos"]


def test_label_list_from_config_fixes_the_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\n")
    data, labels = load_labelled_texts(path, "text", "label", ["pos", "neg", "neutral"])
    assert labels == ["pos", "neg", "neutral"] and data.labels.tolist() == [0, 1]


def test_split_and_shards_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    n = 101
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"row {i}" for i in range(n)], "label": ["a", "b"] * 50 + ["a"]}).to_csv(path, index=False)
    data, _ = load_labelled_texts(path, "text", "label", None)
    parts = [shard(data, i, 3, seed=5, key="k") for i in range(3)]
    seen = [t for p in parts for t in p.texts]
    assert sorted(seen) == sorted(data.texts) and len(set(seen)) == n
    assert [len(p) for p in parts] == [34, 34, 33]
    assert shard(data, 1, 3, seed=5, key="k").texts == parts[1].texts
    assert shard(data, 1, 3, seed=6, key="k").texts != parts[1].texts
    train, held = split_train_eval(parts[0], 0.2, seed=5, key="site")
    assert len(held) == 7 and len(train) == 27
    assert not set(train.texts) & set(held.texts)
    again = split_train_eval(parts[0], 0.2, seed=5, key="site")
    assert again[1].texts == held.texts and np.array_equal(again[1].labels, held.labels)


def test_too_small_a_site_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    data, _ = load_labelled_texts(path, "text", "label", None)
    with pytest.raises(DataError, match="shard 3 of 3 has 1 rows"):
        shard(data, 2, 3, seed=0, key="x")
