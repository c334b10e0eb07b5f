"""Non-IID partitions of a real data file (``fedlora.simulation.partition``, ``[partition]``,
``fedlora simulate --partition``): the math against Flower Datasets' own partitioners, the
promises each scheme makes, the errors, and one run end to end (partition.json, the sites' rows)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedlora.cli import _parser, simulate_config
from fedlora.config import PartitionConfig, config_from_dict
from fedlora.errors import ConfigError, DataError
from fedlora.simulation.partition import covering_assignment, partition_rows

KINDS = {"iid": PartitionConfig(), "dirichlet": PartitionConfig(kind="dirichlet", alpha=0.5),
         "pathological": PartitionConfig(kind="pathological", classes=2), "size": PartitionConfig(kind="size"),
         "column": PartitionConfig(kind="column", by="branch")}


def _labels(n: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _groups(n: int, values: int = 4) -> list[str]:
    return [f"branch-{i % values}" for i in range(n)]


def _hist(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> list[list[int]]:
    return [np.bincount(labels[p], minlength=classes).tolist() for p in parts]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_scheme_gives_disjoint_complete_sorted_shards(kind: str) -> None:
    y = _labels(301, 5)
    parts = partition_rows(y, 4, KINDS[kind], seed=11, groups=_groups(301))
    every = np.concatenate(parts)
    assert len(every) == len(set(every.tolist())), "disjoint"
    assert sorted(every.tolist()) == list(range(301)), "complete: every row at exactly one site"
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) and len(p) >= 2 for p in parts)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "size"])
def test_same_seed_same_rows_other_seed_other_rows(kind: str) -> None:
    y = _labels(240, 4)
    a, b, c = (partition_rows(y, 3, KINDS[kind], seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_column_rows_do_not_depend_on_the_seed() -> None:
    y, g = _labels(60, 3), _groups(60, 3)
    a, b = partition_rows(y, 1, KINDS["column"], seed=1, groups=g), partition_rows(y, 1, KINDS["column"], seed=2, groups=g)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))


def test_iid_is_an_even_split_as_flower_iid_partitioner() -> None:
    y = _labels(101, 2)
    parts = partition_rows(y, 3, PartitionConfig(), seed=5)
    assert sorted(len(p) for p in parts) == [33, 34, 34]
    shares = [np.bincount(y[p], minlength=2) / len(p) for p in parts]
    assert all(abs(s[0] - np.mean(y == 0)) < 0.2 for s in shares)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")  # the oracle's own redraw warnings
@pytest.mark.parametrize(("sites", "alpha", "min_size", "seed"), [(6, 0.5, 2, 0), (4, 0.1, 5, 3), (3, 10.0, 2, 9)])
def test_dirichlet_histograms_equal_flower_dirichlet_partitioner(sites: int, alpha: float, min_size: int, seed: int) -> None:
    """Oracle: flwr-datasets' DirichletPartitioner on the same labels and seed. Which rows a class
    gives each site depends on the shuffle, but how many (the histogram) only on the draws."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    y = _labels(600, 5, seed=1)
    ours = partition_rows(y, sites, PartitionConfig(kind="dirichlet", alpha=alpha, min_size=min_size), seed=seed)
    oracle = DirichletPartitioner(num_partitions=sites, partition_by="label", alpha=alpha, min_partition_size=min_size,
                                  self_balancing=False, seed=seed)
    oracle.dataset = datasets.Dataset.from_dict({"label": y})
    expected = [np.bincount(np.asarray(oracle.load_partition(i)["label"]), minlength=5).tolist() for i in range(sites)]
    assert _hist(y, ours, 5) == expected


def test_small_alpha_skews_the_label_mix_and_large_alpha_does_not() -> None:
    y = _labels(600, 3, seed=2)

    def mean_max_share(alpha: float) -> float:
        shares = [np.bincount(y[p], minlength=3).max() / len(p) for s in range(12)
                  for p in partition_rows(y, 4, PartitionConfig(kind="dirichlet", alpha=alpha), seed=s)]
        return float(np.mean(shares))

    skewed, even = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.7 and even < 0.45 and skewed > even + 0.25, (skewed, even)


@pytest.mark.parametrize(("sites", "k", "classes"), [(3, 2, 6), (4, 2, 5), (10, 1, 3), (2, 3, 3), (5, 3, 7)])
def test_pathological_every_site_exactly_k_classes_and_every_class_covered(sites: int, k: int, classes: int) -> None:
    y = _labels(700, classes, seed=4)
    parts = partition_rows(y, sites, PartitionConfig(kind="pathological", classes=k), seed=8)
    held = [set(np.unique(y[p]).tolist()) for p in parts]
    assert all(len(h) == k for h in held)
    assert set().union(*held) == set(range(classes))
    for c in range(classes):  # a class's rows split evenly among the sites that hold it
        sizes = [int(np.sum(y[p] == c)) for p in parts if c in set(y[p].tolist())]
        assert max(sizes) - min(sizes) <= 1


def test_covering_assignment_is_seeded_and_covers() -> None:
    a = covering_assignment(4, 2, 7, seed=1)
    assert a == covering_assignment(4, 2, 7, seed=1) and a != covering_assignment(4, 2, 7, seed=2)
    assert {c for site in a for c in site} == set(range(7)) and all(len(set(s)) == 2 for s in a)


def test_pathological_refusals_name_the_cohort_and_the_numbers() -> None:
    y = _labels(300, 10)
    with pytest.raises(DataError, match=r"cohort legal: pathological partition: 3 sites x 2 classes per site cover at most 6 "
                                        r"of the file's 10 classes; set partition.classes >= 4"):
        partition_rows(y, 3, PartitionConfig(kind="pathological", classes=2), seed=0, where="cohort legal")
    with pytest.raises(DataError, match="11 classes per site, but the file has only 10 classes"):
        partition_rows(y, 3, PartitionConfig(kind="pathological", classes=11), seed=0)
    rare = np.array([0] * 50 + [1] * 50 + [2])  # class 2 has one row but would be held by several sites
    with pytest.raises(DataError, match=r"class id 2 has 1 row\(s\) but \d sites are to hold it"):
        partition_rows(rare, 6, PartitionConfig(kind="pathological", classes=2), seed=0)


@pytest.mark.parametrize(("n", "sites"), [(120, 3), (451, 6), (1000, 9)])
def test_size_skew_grows_strictly_as_flower_linear_partitioner(n: int, sites: int) -> None:
    y = _labels(n, 3)
    sizes = [len(p) for p in partition_rows(y, sites, PartitionConfig(kind="size"), seed=2)]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    total = sites * (sites + 1) // 2
    expected = [n * s // total for s in range(1, sites + 1)]
    expected[-1] += n - sum(expected)
    assert sizes == expected


def test_column_one_site_per_value_all_rows_sharing_it() -> None:
    y = _labels(90, 3)
    g = [["oslo", "bergen", "tromso"][i % 3] if i % 10 else "alta" for i in range(90)]
    parts = partition_rows(y, 99, KINDS["column"], seed=0, groups=g)  # the sites count is the number of values
    assert len(parts) == 4
    values = [{g[i] for i in p} for p in parts]
    assert all(len(v) == 1 for v in values)
    assert [v.pop() for v in values] == sorted(set(g)), "sites in the sorted order of the values (NaturalIdPartitioner)"


def test_too_small_sites_and_unmet_min_size_are_refused() -> None:
    y = _labels(5, 2)
    with pytest.raises(DataError, match=r"cohort x \(f.csv\): iid partition of 5 rows over 3 sites cannot give every site 2 rows"):
        partition_rows(y, 3, PartitionConfig(), seed=0, where="cohort x (f.csv)")
    with pytest.raises(DataError, match=r"partition of 100 rows over 4 sites cannot give every site 30 rows \(partition.min_size 30"):
        partition_rows(_labels(100, 2), 4, PartitionConfig(kind="size", min_size=30), seed=0)
    with pytest.raises(DataError, match=r"the size \(linear\) partition gives site 1 of 4 4 row\(s\); every site needs at least 8 \(partition.min_size 8\); sizes \[4, 8, 12, 16\]"):
        partition_rows(_labels(40, 2), 4, PartitionConfig(kind="size", min_size=8), seed=0)
    with pytest.raises(DataError, match=r"cohort m: the dirichlet partition \(alpha 0.01\) of 200 rows over 4 sites left a site "
                                        r"with fewer than 45 rows \(partition.min_size\) in all 11 Dirichlet draws"):
        partition_rows(_labels(200, 2), 4, PartitionConfig(kind="dirichlet", alpha=0.01, min_size=45), seed=0, where="cohort m")
    g = ["a"] * 30 + ["b"]
    with pytest.raises(DataError, match=r"gives site 2 of 2 \(branch = 'b'\) 1 row\(s\)"):
        partition_rows(_labels(31, 2), 1, KINDS["column"], seed=0, groups=g)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [({"kind": "shards"}, "partition.kind", "shards"), ({"kind": "dirichlet", "alpha": 0.0}, "partition.alpha", 0.0),
     ({"alpha": -1}, "partition.alpha", -1.0), ({"kind": "pathological", "classes": 0}, "partition.classes", 0),
     ({"min_size": 1}, "partition.min_size", 1), ({"kind": "column"}, "partition.by", ""),
     ({"kind": "dirichlet", "by": "branch"}, "partition.by", "branch")],
)
def test_partition_config_errors_name_the_key(section: dict, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"partition": section, "cohorts": {"finance": {"sites": 3, "data": "x.csv"}}})
    assert (err.value.key, err.value.value) == (key, value)


def test_a_non_iid_partition_without_a_data_file_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"partition.kind = 'size': splits a cohort's data file .* no cohort has one"):
        config_from_dict({"partition": {"kind": "size"}, "cohorts": {"finance": {}}})
    assert config_from_dict({"cohorts": {"finance": {}}}).partition.kind == "iid", "iid is the default and fits demo cohorts"


def test_partition_section_round_trips_and_the_flags_map_to_it() -> None:
    cfg = config_from_dict({"partition": {"kind": "column", "by": "branch", "min_size": 4}, "cohorts": {"finance": {"data": "f.csv"}}})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.partition.describe() == {"kind": "column", "by": "branch", "min_size": 4}
    args = _parser().parse_args(["simulate", "--data", "finance=/x/f.csv", "--partition", "dirichlet", "--partition-alpha", "0.3",
                                 "--partition-min-size", "5"])
    got = simulate_config(args).partition
    assert (got.kind, got.alpha, got.min_size, got.by) == ("dirichlet", 0.3, 5, "")
    args = _parser().parse_args(["simulate", "--data", "finance=/x/f.csv", "--partition", "pathological", "--partition-classes", "3"])
    assert simulate_config(args).partition.classes == 3
    args = _parser().parse_args(["simulate", "--data", "finance=/x/f.csv", "--partition", "column", "--partition-by", "branch"])
    assert simulate_config(args).partition.by == "branch"


def _csv(path: Path, n: int = 120, branches: int = 4) -> Path:
    rng = np.random.default_rng(0)
    words = {"up": "gains rally surge", "down": "losses slump fall", "flat": "steady unchanged calm"}
    ys = rng.choice(list(words), n)
    pd.DataFrame({"text": [f"row {i}: stock {rng.choice(words[y].split())} today" for i, y in enumerate(ys)], "label": ys,
                  "branch": [f"b{i % branches}" for i in range(n)]}).to_csv(path, index=False)
    return path


def test_column_partition_plans_one_site_per_value_and_says_so(tmp_path: Path, caplog) -> None:
    from fedlora.simulation.runner import plan_sites

    path = _csv(tmp_path / "f.csv", branches=5)
    cfg = config_from_dict({"partition": {"kind": "column", "by": "branch"}, "cohorts": {"finance": {"sites": 3, "data": str(path)}},
                            "secure_aggregation": {"enabled": False}})
    with caplog.at_level(logging.INFO, logger="fedlora.simulation"):
        plan = plan_sites(cfg)
    assert plan.cfg.cohort("finance").sites == 5 and cfg.cohort("finance").sites == 3, "a new config; the caller's is unchanged"
    assert "partition.by 'branch' has 5 distinct values, so the cohort has 5 sites (cohorts.finance.sites was 3)" in caplog.text
    assert [s.name for s in plan.sites] == [f"finance-{i}" for i in range(1, 6)]
    assert plan.groups == {f"finance-{i + 1}": f"b{i}" for i in range(5)}
    assert all(all(r % 5 == i for r in s.rows) for i, s in enumerate(plan.sites))
    missing = config_from_dict({"partition": {"kind": "column", "by": "hospital"}, "cohorts": {"finance": {"data": str(path)}}})
    with pytest.raises(DataError, match="f.csv: no column 'hospital' to partition by"):
        plan_sites(missing)


def test_dirichlet_run_end_to_end_writes_partition_json_and_sites_read_their_rows(make_config, tmp_path: Path, monkeypatch) -> None:
    from fedlora.client import app as client_app
    from fedlora.simulation.runner import simulate

    path = _csv(tmp_path / "market.csv")
    file = pd.read_csv(path)
    seen: dict[str, tuple[set[str], set[str]]] = {}
    real_split = client_app.split_train_eval

    def spy(data, fraction, seed, key):  # what each site really trains and evaluates on
        train, held = real_split(data, fraction, seed, key)
        seen[key] = (set(train.texts), set(held.texts))
        return train, held

    monkeypatch.setattr(client_app, "split_train_eval", spy)
    cfg = make_config(tmp_path / "run", train__rounds=1, train__local_steps=2, partition__kind="dirichlet", partition__alpha=0.5,
                      partition__min_size=8, cohorts={"finance": {"sites": 3, "data": str(path)}, "medical": {"sites": 2}})
    run, summary = simulate(cfg, progress=False)
    table = json.loads((run / "partition.json").read_text())
    assert table["partition"] == {"kind": "dirichlet", "alpha": 0.5, "min_size": 8}
    assert summary["partition"] == {"kind": "dirichlet", "alpha": 0.5, "min_size": 8, "cohorts": ["finance"]}
    demo = [s for s in table["sites"] if s["cohort"] == "medical"]
    assert [s["name"] for s in demo] == ["medical-1", "medical-2"] and all(s["partition"] == "demo" and "rows" not in s for s in demo)
    for s in demo:  # one generated file per demo site
        counts = pd.read_csv(s["data"])["label"].value_counts().to_dict()
        assert {k: v for k, v in s["labels"].items() if v} == counts and sum(counts.values()) == s["num_rows"]
    sites = [s for s in table["sites"] if s["cohort"] == "finance"]
    assert [s["name"] for s in sites] == ["finance-1", "finance-2", "finance-3"]
    totals = {lab: sum(s["labels"][lab] for s in sites) for lab in ("down", "flat", "up")}
    assert totals == file["label"].value_counts().to_dict()
    assert sorted(r for s in sites for r in s["rows"]) == list(range(len(file)))
    for s in sites:
        rows = file.iloc[s["rows"]]
        assert s["num_rows"] == len(rows) >= 8 and s["data"] == str(path.resolve()) and s["partition"] == "dirichlet"
        assert s["labels"] == {lab: int((rows["label"] == lab).sum()) for lab in ("down", "flat", "up")}
        train, held = seen[s["name"]]
        assert train | held == set(rows["text"]) and not train & held, "a site trains and evaluates on exactly its rows"
