"""Split one cohort's data file across its sites (IID or non-IID), with Flower Datasets' partitioners.

A pure function of (the rows' class ids, an optional group column, the number of sites, the
``[partition]`` config, a seed) to one sorted array of row indices (0-based data rows) per site.
The simulator calls it once per cohort at the coordinator side (``runner.plan_sites``), seeded
by the run's seed and the cohort name; every virtual site then reads exactly its rows.

The rows are first put in a seeded random order, as ``flwr_datasets.FederatedDataset`` shuffles
a split before it partitions it; each scheme is the named ``flwr_datasets.partitioner`` class run
on a ``datasets.Dataset`` of (row id, label[, group]) in that order. With n rows, S sites, C
classes (those present in the file) and n_k rows of class k:

* ``iid`` -- ``IidPartitioner(S)``: contiguous shards of the shuffled rows; site s gets
  ``floor(n/S)`` or ``ceil(n/S)`` rows (sizes differ by at most 1), every row once.
* ``dirichlet`` -- ``DirichletPartitioner(partition_by="label", alpha=A, min_partition_size=M,
  self_balancing=False)`` (Hsu et al. 2019 / Yurochkin et al. 2019): for every class k
  independently, proportions ``p_k ~ Dirichlet(A * 1_S)``; class k's rows (in shuffled order)
  are cut at ``floor(cumsum(p_k) * n_k)``. Small A puts each class on few sites, A -> inf gives
  every site the file's label mix. If a site gets fewer than M rows the whole draw is repeated
  (flwr: at most 10 more draws, then an error). Every row once. ``self_balancing=False`` is
  flwr's default and keeps the pure Dirichlet math (True would stop feeding sites already above
  n/S, making the result depend on the order of the classes).
* ``pathological`` -- ``PathologicalPartitioner(num_classes_per_partition=K)`` with a covering
  class assignment: the classes in a seeded random order c_0..c_{C-1}; site s (0-based) holds
  ``c_{(s*K + i) mod C}`` for i < K, i.e. exactly K distinct classes (K <= C), and every class is
  held by some site when ``S*K >= C`` (else an error: flwr's own modes ``random`` and
  ``deterministic`` can leave classes out, and drop their rows). Each class's rows are split
  evenly (``array_split``) among the sites that hold it. Every row once.
* ``size`` -- ``LinearPartitioner(S)`` (size skew, labels IID): site s (1-based) gets
  ``floor(n * s / (S(S+1)/2))`` rows, the remainder to the last, so sizes grow strictly with s
  whenever the smallest site has at least 1 row (consecutive sizes differ by >= floor(n/T) with
  T = S(S+1)/2). Linear rather than ``ExponentialPartitioner``, whose first site of 10 would
  hold e/sum(e^s) ~ 0.008% of the rows. Every row once.
* ``column`` -- ``NaturalIdPartitioner(partition_by=COLUMN)``: natural sites, one per distinct
  value of the column (sorted), each with every row of its value; S is the number of values
  (``sites`` is ignored). Every row once.

Every scheme refuses a site with fewer than ``max(2, min_size)`` rows (a site needs one row to
train and one to evaluate). Errors name the cohort, the scheme and the numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np

from fedlora.config import PartitionConfig
from fedlora.errors import DataError

log = logging.getLogger("fedlora.simulation")


def partition_rows(labels: np.ndarray, n_sites: int, cfg: PartitionConfig, seed: int, *,
                   groups: Sequence[str] | None = None, where: str = "cohort") -> list[np.ndarray]:
    """Row indices (sorted int64 arrays) of each site; ``labels`` are the rows' class ids,
    ``groups`` the ``cfg.by`` column's values (kind ``column`` only), ``where`` names the cohort
    (and file) in errors. Deterministic in ``seed``; disjoint, and together every row."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    kind = cfg.kind
    floor = max(2, cfg.min_size)
    if kind == "column":
        if groups is None or len(groups) != n:
            raise DataError(f"{where}: partition column needs the {cfg.by!r} value of each of the {n} rows")
        n_sites = len(set(groups))
    if n_sites < 1:
        raise DataError(f"{where}: {kind} partition over {n_sites} sites")
    if n < floor * n_sites:
        raise DataError(f"{where}: {kind} partition of {n} rows over {n_sites} sites cannot give every site {floor} rows "
                        f"(partition.min_size {cfg.min_size}; a site needs at least 2); use fewer sites or more data")
    order = np.random.default_rng((seed, 1)).permutation(n)  # as FederatedDataset shuffles before partitioning
    columns: dict[str, object] = {"row": order, "label": labels[order]}
    if kind == "column":
        columns["group"] = [str(groups[i]) for i in order]  # type: ignore[index]
    partitioner = _partitioner(kind, labels, n_sites, cfg, seed, where)
    parts = _run(partitioner, columns, n_sites, cfg, where)
    sizes = [len(p) for p in parts]
    small = [i for i, s in enumerate(sizes) if s < floor]
    if small:
        i = small[0]
        named = f" ({cfg.by} = {groups[parts[i][0]]!r})" if kind == "column" and sizes[i] else ""  # type: ignore[index]
        raise DataError(f"{where}: {_describe(cfg)} gives site {i + 1} of {n_sites}{named} {sizes[i]} row(s); every site needs at "
                        f"least {floor} (partition.min_size {cfg.min_size}); sizes {sizes}")
    return parts


def _describe(cfg: PartitionConfig) -> str:
    return {"iid": "the iid partition", "dirichlet": f"the dirichlet partition (alpha {cfg.alpha:g})",
            "pathological": f"the pathological partition ({cfg.classes} classes per site)", "size": "the size (linear) partition",
            "column": f"the column partition by {cfg.by!r}"}[cfg.kind]


def _partitioner(kind: str, labels: np.ndarray, n_sites: int, cfg: PartitionConfig, seed: int, where: str):
    from flwr_datasets import partitioner as fp  # imported here: it takes seconds (datasets, matplotlib)

    if kind == "iid":
        return fp.IidPartitioner(num_partitions=n_sites)
    if kind == "dirichlet":
        return fp.DirichletPartitioner(num_partitions=n_sites, partition_by="label", alpha=float(cfg.alpha),
                                       min_partition_size=max(2, cfg.min_size), self_balancing=False, shuffle=True, seed=seed)
    if kind == "pathological":
        present, counts = np.unique(labels, return_counts=True)
        c, k = len(present), cfg.classes
        if k > c:
            raise DataError(f"{where}: pathological partition with {k} classes per site, but the file has only {c} classes; "
                            f"set partition.classes <= {c}")
        if n_sites * k < c:
            raise DataError(f"{where}: pathological partition: {n_sites} sites x {k} classes per site cover at most "
                            f"{n_sites * k} of the file's {c} classes; set partition.classes >= {-(-c // n_sites)} or use more sites")
        assignment = covering_assignment(n_sites, k, c, seed)
        held = np.bincount([j for classes in assignment for j in classes], minlength=c)
        short = [j for j in range(c) if counts[j] < held[j]]
        if short:
            j = short[0]
            raise DataError(f"{where}: pathological partition: class id {int(present[j])} has {int(counts[j])} row(s) but "
                            f"{int(held[j])} sites are to hold it; lower partition.classes or use fewer sites")
        return _covering_pathological(fp, [[int(present[j]) for j in classes] for classes in assignment], seed)
    if kind == "size":
        return fp.LinearPartitioner(num_partitions=n_sites)
    if kind == "column":
        return fp.NaturalIdPartitioner(partition_by="group")
    raise DataError(f"{where}: unknown partition kind {kind!r}")


def covering_assignment(n_sites: int, k: int, c: int, seed: int) -> list[list[int]]:
    """The pathological scheme's classes (positions in the sorted class list) of each site: the
    classes in a seeded random order o; site s holds ``o[(s*k + i) mod c]`` for i < k."""
    order = np.random.default_rng((seed, 2)).permutation(c)
    return [[int(order[(s * k + i) % c]) for i in range(k)] for s in range(n_sites)]


def _covering_pathological(fp, assignment: list[list[int]], seed: int):
    """flwr's PathologicalPartitioner (its per-class split, checks and shuffle) with ``assignment``
    (class ids per site) in place of the one its ``class_assignment_mode`` would draw."""

    class CoveringPathological(fp.PathologicalPartitioner):
        def _determine_partition_id_to_unique_labels(self) -> None:  # flwr-datasets 0.6.1's assignment step
            self._unique_labels = sorted(self.dataset.unique(self._partition_by))
            for pid, classes in enumerate(assignment):
                self._partition_id_to_unique_labels[pid] = list(classes)

    return CoveringPathological(num_partitions=len(assignment), partition_by="label", num_classes_per_partition=len(assignment[0]),
                                shuffle=True, seed=seed)


def _run(partitioner, columns: dict[str, object], n_sites: int, cfg: PartitionConfig, where: str) -> list[np.ndarray]:
    import datasets

    kind = cfg.kind

    partitioner.dataset = datasets.Dataset.from_dict(columns)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):  # flwr's tqdm bar, retry warnings
        warnings.simplefilter("always")
        try:
            if partitioner.num_partitions != n_sites:
                raise DataError(f"{where}: {kind} partition made {partitioner.num_partitions} sites, expected {n_sites}")
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)) for i in range(n_sites)]
        except ValueError as e:  # flwr's own refusals (Dirichlet: no draw met min_partition_size in 11 tries)
            draws = sum("min_partition_size" in str(w.message) for w in caught)  # flwr warns once per failed draw
            if draws:
                raise DataError(f"{where}: the dirichlet partition (alpha {cfg.alpha:g}) of {len(columns['row'])} rows "
                                f"over {n_sites} sites left a site with fewer than {max(2, cfg.min_size)} rows "
                                f"(partition.min_size) in all {draws} Dirichlet draws; raise partition.alpha, lower "
                                f"partition.min_size, or use fewer sites") from None
            raise DataError(f"{where}: the {kind} partition of {len(columns['row'])} rows over {n_sites} sites failed: {e}") from None
    redraws = sum("min_partition_size" in str(w.message) for w in caught)
    if redraws:
        log.info("%s: the dirichlet partition was drawn %d times to give every site its partition.min_size", where, redraws + 1)
    return parts
