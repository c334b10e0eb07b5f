"""Data loading at a site: a corpus of broken files, each with an error that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedlora.client.data import load_labelled_texts, read_group_column, split_train_eval
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


def test_subset_and_split_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    n = 101
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"row {i}" for i in range(n)], "label": ["a", "b"] * 50 + ["a"]}).to_csv(path, index=False)
    data, _ = load_labelled_texts(path, "text", "label", None)
    part = data.subset((0, 5, 7, 100))
    assert part.texts == ("row 0", "row 5", "row 7", "row 100") and part.labels.tolist() == [0, 1, 1, 0]
    part = data.subset(np.arange(34))
    train, held = split_train_eval(part, 0.2, seed=5, key="site")
    assert len(held) == 7 and len(train) == 27
    assert not set(train.texts) & set(held.texts) and set(train.texts) | set(held.texts) == set(part.texts)
    again = split_train_eval(part, 0.2, seed=5, key="site")
    assert again[1].texts == held.texts and np.array_equal(again[1].labels, held.labels)
    assert split_train_eval(part, 0.2, seed=6, key="site")[1].texts != held.texts


def test_a_file_is_read_once_per_process_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    from fedlora.client import data as data_module

    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    reads = []
    real = data_module.read_table
    monkeypatch.setattr(data_module, "read_table", lambda p: reads.append(p) or real(p))
    first, labels = load_labelled_texts(path, "text", "label", None)
    second, again = load_labelled_texts(str(path), "text", "label", None)
    assert len(reads) == 1 and second is first and again == labels == ["neg", "pos"]
    again.append("mutated")
    assert load_labelled_texts(path, "text", "label", None)[1] == ["neg", "pos"], "the caller gets a copy of the label list"
    with pytest.raises(ValueError):
        first.labels[0] = 1  # the cached labels are read-only; subset copies
    load_labelled_texts(path, "text", "label", ["pos", "neg"])  # another label list: another entry
    assert len(reads) == 2
    _write(path, "text,label\na,pos\nb,neg\nc,pos\nd,neg\n")  # another size (and mtime): read again
    assert len(load_labelled_texts(path, "text", "label", None)[0]) == 4 and len(reads) == 3


def test_group_column_values_and_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label,branch\na,pos,north\nb,neg,7\n")
    assert read_group_column(path, "branch") == ["north", "7"]
    with pytest.raises(DataError, match="no column 'site' to partition by"):
        read_group_column(path, "site")
    gap = _write(tmp_path / "gap.csv", "text,label,branch\na,pos,north\nb,neg,\n")
    with pytest.raises(DataError, match="row 2, column 'branch': missing value"):
        read_group_column(gap, "branch")


def test_too_small_a_site_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    data, _ = load_labelled_texts(path, "text", "label", None)
    with pytest.raises(DataError, match="site-3: 1 example"):
        split_train_eval(data.subset([2]), 0.2, seed=0, key="site-3")
