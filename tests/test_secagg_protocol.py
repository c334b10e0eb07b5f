"""SecAgg+ protocol logic: the unmasked sum equals the plain sum under any dropout pattern that
leaves the threshold, aborts cleanly below it, refuses malicious unmask requests, and the
coordinator's view of a site is a uniform-looking vector."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.privacy import masking
from fedlora.privacy.secagg import SecAggAbort, SecAggCoordinator, SecAggSite, UnmaskRefused, neighbours

M = 24  # modulus bits


def _run(n: int, k: int, t: int, d: int, drop: dict[str, set[int]], seed: int = 0):
    """One round over n sites; ``drop[stage]`` = sites that vanish before that stage."""
    rng = np.random.default_rng(seed)
    inputs = {u: rng.integers(0, 2**16, size=d, dtype=np.uint64) for u in range(n)}
    graph = neighbours(range(n), k, random.Random(seed))
    sites = {u: SecAggSite(u, graph[u], t, M, "r1") for u in range(n)}
    coord = SecAggCoordinator(graph, t, M, "r1")
    alive = set(range(n)) - drop.get("advertise", set())
    keys = coord.relay_keys({u: sites[u].advertise() for u in alive})
    alive -= drop.get("share", set())
    sent = {}
    for u in sorted(alive):
        try:
            sent[u] = sites[u].share_keys(keys[u])
        except SecAggAbort:
            pass  # too few neighbours: this site drops out
    inbox = coord.relay_shares(sent)
    for u, boxes in inbox.items():
        sites[u].receive_shares(boxes)
    alive = set(sent) - drop.get("masked", set())
    masked = {u: sites[u].masked_input(inputs[u]) for u in sorted(alive)}
    survivors, dropped = coord.unmask_request(masked)
    responses = {u: sites[u].unmask(survivors, dropped) for u in survivors if u not in drop.get("unmask", set())}
    return coord.aggregate(masked, responses), inputs, survivors, masked


def test_no_dropouts_gives_the_plain_sum() -> None:
    total, inputs, survivors, _ = _run(10, 4, 3, 50, {})
    assert survivors == list(range(10))
    assert np.array_equal(total, masking.add(np.zeros(50, np.uint64), sum(inputs.values()), M))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 12), half_k=st.integers(1, 5), data=st.data())
def test_any_dropout_pattern_sums_exactly_or_aborts_cleanly(n: int, half_k: int, data) -> None:
    k = min(2 * half_k, n - 1)
    t = data.draw(st.integers(1, max(1, k)))
    nodes = st.sets(st.integers(0, n - 1), max_size=n)
    drop = {s: data.draw(nodes) for s in ("advertise", "share", "masked", "unmask")}
    try:
        total, inputs, survivors, _ = _run(n, k, t, 20, drop, seed=data.draw(st.integers(0, 1000)))
    except (SecAggAbort, UnmaskRefused):
        return  # below the threshold somewhere: no sum, nothing revealed
    expected = np.zeros(20, np.uint64)
    for u in survivors:
        expected = masking.add(expected, inputs[u], M)
    assert np.array_equal(total, expected)


def test_dropouts_down_to_the_threshold_recover_and_below_it_abort() -> None:
    # 8 sites, everyone a neighbour of everyone (k = 7), threshold 4: 4 may vanish before the masked input
    total, inputs, survivors, _ = _run(8, 7, 4, 30, {"masked": {0, 1, 2, 3}})
    assert survivors == [4, 5, 6, 7]
    assert np.array_equal(total, masking.add(np.zeros(30, np.uint64), sum(inputs[u] for u in survivors), M))
    with pytest.raises(SecAggAbort, match="only 3 sites sent masked inputs"):
        _run(8, 7, 4, 30, {"masked": {0, 1, 2, 3, 4}})
    with pytest.raises(SecAggAbort, match="shares"):  # enough survivors, too few of them answer the unmask request
        _run(8, 7, 4, 30, {"masked": {0, 1}, "unmask": {2, 3, 4}})


def test_a_site_never_reveals_both_shares_of_one_peer() -> None:
    graph = neighbours(range(4), 3, random.Random(0))
    sites = {u: SecAggSite(u, graph[u], 2, M, "r") for u in range(4)}
    coord = SecAggCoordinator(graph, 2, M, "r")
    keys = coord.relay_keys({u: s.advertise() for u, s in sites.items()})
    inbox = coord.relay_shares({u: s.share_keys(keys[u]) for u, s in sites.items()})
    for u, boxes in inbox.items():
        sites[u].receive_shares(boxes)
    with pytest.raises(UnmaskRefused, match="both survived and dropped"):
        sites[0].unmask([0, 1, 2, 3], [3])
    sites[0].unmask([0, 1, 2, 3], [])  # reveals the self-mask shares of 0, 1, 2, 3
    with pytest.raises(UnmaskRefused, match="already revealed the b share of site 3"):
        sites[0].unmask([0, 1, 2], [3])  # a second request now claiming 3 dropped: its key share would unmask it
    with pytest.raises(UnmaskRefused, match="below the threshold"):
        sites[1].unmask([0], [2, 3])
    with pytest.raises(UnmaskRefused, match="does not count this site among the survivors"):
        sites[2].unmask([0, 1, 3], [2])


def test_the_coordinator_sees_only_uniform_vectors_uncorrelated_with_the_input() -> None:
    d = 20_000
    _, inputs, _, masked = _run(6, 4, 3, d, {})
    for u, y in masked.items():
        x = inputs[u].astype(np.float64)
        corr = np.corrcoef(x, y.astype(np.float64))[0, 1]
        assert abs(corr) < 4 / np.sqrt(d)  # no more than chance correlation
        counts = np.bincount((y >> np.uint64(M - 4)).astype(np.int64), minlength=16)
        assert float(np.sum((counts - d / 16) ** 2 / (d / 16))) < 50  # uniform over the modulus (chi2, 15 dof)
