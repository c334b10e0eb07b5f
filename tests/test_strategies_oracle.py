"""Each strategy against Flower 1.41's own implementation of the same rule on the same inputs.

Flower's Message-API strategies (``flwr.serverapp.strategy``) aggregate the sites' parameters
``theta_k = theta + delta_k``; ours aggregate the updates ``delta_k``. Each oracle runs three
rounds on random updates: Flower is driven through ``configure_train`` / ``aggregate_train``
with reply Messages built by hand and follows its own trajectory (float64); ours runs
``combine`` + ``step`` with its per-cohort state (float32 adapter, as the coordinator keeps it).
Also: the median's and trimmed mean's math on hand-made inputs, Krum's selection by hand,
the state round trip through safetensors, reply-order independence, options and refusals.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.strategy import aggregate as legacy
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedlora.errors import FedloraError
from fedlora.strategies import SiteUpdate, StrategyOptionError, available, get_strategy
from fedlora.strategies.fedprox import proximal_gradient, proximal_penalty
from fedlora.strategies.krum import krum_select
from fedlora.strategies.median import coordinate_median
from fedlora.strategies.trimmed_mean import trimmed_mean

SHAPES = {"layer.lora_B.weight": (4, 3), "head.bias": (5,)}
TOL = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Messages take their sender from the process-wide TaskIdentity (restored after the test)."""
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _Grid:
    """Just enough of a Grid for ``configure_train``: the connected node ids."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _global(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _updates(rng: np.random.Generator, n: int = 5, outliers: int = 0) -> list[SiteUpdate]:
    out = []
    for i in range(n):
        scale = 20.0 if i < outliers else float(rng.uniform(0.05, 0.5))
        out.append(SiteUpdate(f"site-{i}", {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()},
                              float(rng.integers(1, 100))))
    return out


def _flower_round(strategy, server_round: int, theta: dict[str, np.ndarray], updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
    """One Flower round: the global parameters out, the sites' parameters ``theta + delta_k`` back."""
    list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in theta.items()}), ConfigRecord({}),
                                  _Grid(len(updates))))
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({k: Array(theta[k] + np.asarray(u.delta[k], np.float64))
                                                                    for k in theta}),
                                           "metrics": MetricRecord({"num-examples": u.weight})}),
                       dst_node_id=0, message_type=MessageType.TRAIN) for u in updates]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {k: arrays[k].numpy() for k in theta}


def _run_both(ours_name: str, options: dict, flower, rounds: int = 3, seed: int = 0, n: int = 5, outliers: int = 0,
              flower_round: Callable[[int], int] = lambda t: t) -> list[tuple[dict, dict, dict]]:
    """Three rounds of ours and Flower's on the same random updates; per round (ours, Flower's, our state)."""
    rng = np.random.default_rng(seed)
    ours = get_strategy(ours_name, **options)
    theta = _global(rng)
    theirs = {k: v.astype(np.float64) for k, v in theta.items()}
    state = ours.init_state(theta)
    out = []
    for t in range(1, rounds + 1):
        ups = _updates(rng, n, outliers)
        theta, state = ours.step("finance", t, theta, ours.combine(ups), state)
        theirs = _flower_round(flower, flower_round(t), theirs, ups)
        out.append((theta, theirs, state))
    return out


def _assert_close(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == np.float32, "the adapter keeps its dtype"
        np.testing.assert_allclose(ours[k], theirs[k], **TOL, err_msg=k)


# ---- oracles: the "sum" strategies -------------------------------------------------
def test_fedavg_matches_flower_fedavg() -> None:
    for ours, theirs, _ in _run_both("fedavg", {}, flwr_strategy.FedAvg()):
        _assert_close(ours, theirs)


def test_fedavg_server_learning_rate_matches_flower_fedavgm_without_momentum() -> None:
    flower = flwr_strategy.FedAvgM(server_learning_rate=0.7, server_momentum=0.0)
    for ours, theirs, _ in _run_both("fedavg", {"server_learning_rate": 0.7}, flower):
        _assert_close(ours, theirs)


@pytest.mark.parametrize("lr, momentum", [(1.0, 0.9), (0.5, 0.6)])
def test_fedavgm_matches_flower_fedavgm(lr: float, momentum: float) -> None:
    flower = flwr_strategy.FedAvgM(server_learning_rate=lr, server_momentum=momentum)
    rounds = _run_both("fedavgm", {"server_learning_rate": lr, "server_momentum": momentum}, flower)
    for ours, theirs, _ in rounds:
        _assert_close(ours, theirs)
    # Flower keeps the pseudo-gradient's momentum v = -m
    _, _, state = rounds[-1]
    for k, v in zip(SHAPES, flower.momentum_vector, strict=True):
        np.testing.assert_allclose(state[f"m/{k}"], -v, **TOL)


def test_fedprox_server_side_matches_flower_fedprox_and_sends_mu() -> None:
    flower = flwr_strategy.FedProx(proximal_mu=0.3)
    for ours, theirs, _ in _run_both("fedprox", {"mu": 0.3}, flower):
        _assert_close(ours, theirs)
    msgs = list(flower.configure_train(1, ArrayRecord({"x": Array(np.zeros(2))}), ConfigRecord({}), _Grid(2)))
    assert get_strategy("fedprox", mu=0.3).site_options() == {"proximal_mu": msgs[0].content["config"]["proximal-mu"]}


@pytest.mark.parametrize("options", [{}, {"eta": 0.03, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}])
def test_fedadam_matches_flower_fedadam(options: dict) -> None:
    flower = flwr_strategy.FedAdam(**options)
    # Flower bias-corrects with t = server_round + 1: our step t is its server_round t - 1
    rounds = _run_both("fedadam", options, flower, flower_round=lambda t: t - 1)
    for ours, theirs, _ in rounds:
        _assert_close(ours, theirs)
    _, _, state = rounds[-1]
    assert int(state["t"]) == 3
    for k in SHAPES:
        np.testing.assert_allclose(state[f"m/{k}"], flower.m_t[k], **TOL)
        np.testing.assert_allclose(state[f"v/{k}"], flower.v_t[k], **TOL)


def test_fedadam_without_bias_correction_is_the_papers_rule() -> None:
    rng = np.random.default_rng(5)
    theta, ups = _global(rng), _updates(rng)
    s = get_strategy("fedadam", bias_correction=False, eta=0.05)
    nxt, _ = s.step("c", 1, theta, s.combine(ups), s.init_state(theta))
    mean = s.combine(ups)
    for k in SHAPES:  # m_1 = 0.1 D, v_1 = 0.01 D^2
        d = np.asarray(mean[k], np.float64)
        expected = theta[k] + 0.05 * 0.1 * d / (np.sqrt(0.01 * d**2) + 1e-3)
        np.testing.assert_allclose(nxt[k], expected, **TOL)


@pytest.mark.parametrize("options", [{}, {"eta": 0.1, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}])
def test_fedyogi_matches_flower_fedyogi(options: dict) -> None:
    flower = flwr_strategy.FedYogi(**options)
    rounds = _run_both("fedyogi", options, flower)
    for ours, theirs, _ in rounds:
        _assert_close(ours, theirs)
    for k in SHAPES:
        np.testing.assert_allclose(rounds[-1][2][f"v/{k}"], flower.v_t[k], **TOL)


@pytest.mark.parametrize("options", [{}, {"eta": 0.02, "tau": 1e-2}])
def test_fedadagrad_matches_flower_fedadagrad(options: dict) -> None:
    flower = flwr_strategy.FedAdagrad(**options)
    rounds = _run_both("fedadagrad", options, flower)
    for ours, theirs, _ in rounds:
        _assert_close(ours, theirs)
    for k in SHAPES:
        np.testing.assert_allclose(rounds[-1][2][f"v/{k}"], flower.v_t[k], **TOL)


# ---- oracles: the "each" strategies ------------------------------------------------
@pytest.mark.parametrize("n", [5, 6])
def test_median_matches_flower_fedmedian(n: int) -> None:
    for ours, theirs, _ in _run_both("median", {}, flwr_strategy.FedMedian(), n=n, outliers=1):
        _assert_close(ours, theirs)


@pytest.mark.parametrize("beta, n", [(0.2, 5), (0.2, 7), (0.0, 4), (0.34, 6)])
def test_trimmed_mean_matches_flower_fedtrimmedavg(beta: float, n: int) -> None:
    for ours, theirs, _ in _run_both("trimmed_mean", {"beta": beta}, flwr_strategy.FedTrimmedAvg(beta=beta), n=n, outliers=1):
        _assert_close(ours, theirs)


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_matches_flower_krum(f: int) -> None:
    for ours, theirs, _ in _run_both("krum", {"byzantine": f}, flwr_strategy.Krum(num_malicious_nodes=f), n=7, outliers=2):
        _assert_close(ours, theirs)


@pytest.mark.parametrize("f, m", [(1, 3), (2, 4), (2, 0)])
def test_multikrum_matches_flower_multikrum(f: int, m: int) -> None:
    n = 8
    flower = flwr_strategy.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m or n - f)
    for ours, theirs, _ in _run_both("multikrum", {"byzantine": f, "selected": m}, flower, n=n, outliers=2):
        _assert_close(ours, theirs)


@pytest.mark.parametrize("name, options, rule", [
    ("median", {}, lambda res: legacy.aggregate_median(res)),
    ("trimmed_mean", {"beta": 0.25}, lambda res: legacy.aggregate_trimmed_avg(res, 0.25)),
    ("krum", {"byzantine": 1}, lambda res: legacy.aggregate_krum(res, num_malicious=1, to_keep=0)),
    ("multikrum", {"byzantine": 1, "selected": 3}, lambda res: legacy.aggregate_krum(res, num_malicious=1, to_keep=3)),
])
def test_robust_rules_match_flowers_legacy_aggregate_helpers(name: str, options: dict, rule) -> None:
    rng = np.random.default_rng(11)
    theta, ups = _global(rng), _updates(rng, n=8, outliers=2)
    s = get_strategy(name, **options)
    ours, _ = s.step("c", 1, theta, s.combine(ups), {})
    keys = list(SHAPES)
    res = [([theta[k].astype(np.float64) + u.delta[k] for k in keys], int(u.weight)) for u in ups]
    theirs = dict(zip(keys, rule(res), strict=True))
    _assert_close(ours, theirs)


# ---- hand-made inputs --------------------------------------------------------------
def _one(site: str, x: list[float], n: float = 1.0) -> SiteUpdate:
    return SiteUpdate(site, {"x": np.array(x, dtype=np.float32)}, n)


def test_median_math_on_hand_made_inputs() -> None:
    assert coordinate_median([np.array([1.0, 7.0]), np.array([5.0, -1.0]), np.array([2.0, 3.0])]).tolist() == [2.0, 3.0]
    assert coordinate_median([np.array([1.0]), np.array([2.0]), np.array([10.0]), np.array([20.0])]).tolist() == [6.0]
    s = get_strategy("median")
    g = {"x": np.array([10.0, 0.0], np.float32)}
    # weights do not matter: a site with many examples buys no influence
    ups = [_one("a", [1.0, 7.0], 1000.0), _one("b", [5.0, -1.0]), _one("c", [2.0, 3.0])]
    assert s.step("c", 1, g, s.combine(ups), {})[0]["x"].tolist() == [12.0, 3.0]
    # one arbitrary update moves each coordinate at most within the honest ones' range
    ups.append(_one("evil", [1e9, -1e9]))
    out = s.step("c", 1, g, s.combine(ups), {})[0]["x"] - g["x"]
    assert 1.0 <= out[0] <= 5.0 and -1.0 <= out[1] <= 7.0


def test_trimmed_mean_math_on_hand_made_inputs() -> None:
    xs = [np.array([v]) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    assert trimmed_mean(xs, 0.2).tolist() == [2.0]  # cut 1 each end: mean(1, 2, 3)
    assert trimmed_mean(xs, 0.1).tolist() == [21.2]  # floor(0.5) = 0: the plain mean
    assert trimmed_mean(xs, 0.4).tolist() == [2.0]  # cut 2 each end: the median
    per_coord = trimmed_mean([np.array([0.0, 9.0]), np.array([5.0, 1.0]), np.array([-50.0, 2.0]), np.array([1.0, 3.0])], 0.25)
    assert per_coord.tolist() == [0.5, 2.5]  # each coordinate trimmed on its own
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(xs, 0.5)


def test_krum_selects_by_hand_computed_scores() -> None:
    # 1-D: f = 1, n = 5, each score sums the 2 nearest squared distances:
    # a: .0025 + .01 = .0125, b: .0025 + .01 = .0125, c: .01 + .0225 = .0325, d: .0025 + .0025 = .005, e: huge
    ups = [_one("a", [0.0]), _one("b", [0.1]), _one("c", [-0.1]), _one("d", [0.05]), _one("e", [100.0])]
    assert [u.site for u in krum_select(ups, 1, 1)] == ["d"]
    assert [u.site for u in krum_select(ups, 1, 3)] == ["d", "a", "b"]  # a/b tie: the name that sorts first
    g = {"x": np.array([1.0], np.float32)}
    assert get_strategy("krum", byzantine=1).aggregate(g, ups)["x"].tolist() == [np.float32(1.05)]
    # multi-Krum averages the chosen with their example weights (a: 1, b: 3, d: 1)
    ups[1] = _one("b", [0.1], 3.0)
    out = get_strategy("multikrum", byzantine=1, selected=3).aggregate(g, ups)["x"]
    np.testing.assert_allclose(out, [1.0 + (0.05 + 0.0 + 3 * 0.1) / 5], **TOL)
    assert get_strategy("multikrum", byzantine=1).how_many(5) == 4  # default: n - f


# ---- state, order, cohorts ---------------------------------------------------------
ALL_OPTIONS = {"fedavg": {"server_learning_rate": 0.9}, "fedavgm": {"server_momentum": 0.7}, "fedprox": {"mu": 0.1},
               "fedadam": {"eta": 0.05}, "fedyogi": {"eta": 0.05}, "fedadagrad": {"eta": 0.05, "beta_1": 0.5},
               "median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {"byzantine": 1}, "multikrum": {"byzantine": 1, "selected": 3}}


def test_every_registered_strategy_is_covered_here() -> None:
    assert set(ALL_OPTIONS) == set(available())


@pytest.mark.parametrize("name", sorted(ALL_OPTIONS))
def test_state_saved_as_safetensors_and_loaded_gives_the_identical_next_step(name: str) -> None:
    rng = np.random.default_rng(21)
    s = get_strategy(name, **ALL_OPTIONS[name])
    theta = _global(rng)
    rounds = [_updates(rng, n=6, outliers=1) for _ in range(3)]
    state = s.init_state(theta)
    for ups in rounds[:2]:
        theta, state = s.step("finance", 1, theta, s.combine(ups), state)
    # a checkpoint: the adapter and the state through safetensors bytes, then a fresh instance
    theta2 = st_load(st_save(dict(theta)))
    state2 = st_load(st_save(dict(state))) if state else {}
    s2 = get_strategy(name, **ALL_OPTIONS[name])
    a, sa = s.step("finance", 3, theta, s.combine(rounds[2]), state)
    b, sb = s2.step("finance", 3, theta2, s2.combine(rounds[2]), state2)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert set(sa) == set(sb) and all(np.array_equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    if name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert sa, "a server optimiser keeps per-cohort state"
        # the state matters: a fresh state gives a different step
        c, _ = s.step("finance", 3, theta, s.combine(rounds[2]), s.init_state(theta))
        assert not all(np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", sorted(ALL_OPTIONS))
def test_the_result_does_not_depend_on_reply_order(name: str) -> None:
    rng = np.random.default_rng(8)
    s = get_strategy(name, **ALL_OPTIONS[name])
    theta, ups = _global(rng), _updates(rng, n=7, outliers=2)
    a, _ = s.step("c", 1, theta, s.combine(ups), s.init_state(theta))
    b, _ = s.step("c", 1, theta, s.combine(list(reversed(ups))), s.init_state(theta))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_one_instance_keeps_cohorts_apart_through_their_states() -> None:
    rng = np.random.default_rng(9)
    shared, alone_a, alone_b = (get_strategy("fedadam") for _ in range(3))
    ga, gb = _global(rng), _global(rng)
    sa, sb = shared.init_state(ga), shared.init_state(gb)
    ra, rb = alone_a.init_state(ga), alone_b.init_state(gb)
    ha, hb = dict(ga), dict(gb)
    for t in (1, 2, 3):
        ua, ub = _updates(rng), _updates(rng)
        ga, sa = shared.step("a", t, ga, shared.combine(ua), sa)
        gb, sb = shared.step("b", t, gb, shared.combine(ub), sb)
        ha, ra = alone_a.step("a", t, ha, alone_a.combine(ua), ra)
        hb, rb = alone_b.step("b", t, hb, alone_b.combine(ub), rb)
    assert all(np.array_equal(ga[k], ha[k]) and np.array_equal(gb[k], hb[k]) for k in ga)


def test_step_does_not_mutate_its_inputs() -> None:
    rng = np.random.default_rng(12)
    s = get_strategy("fedyogi")
    theta, ups = _global(rng), _updates(rng)
    state = s.init_state(theta)
    before = ({k: v.copy() for k, v in theta.items()}, {k: v.copy() for k, v in state.items()})
    s.step("c", 1, theta, s.combine(ups), state)
    assert all(np.array_equal(theta[k], before[0][k]) for k in theta)
    assert all(np.array_equal(state[k], before[1][k]) for k in state)


def test_a_mismatched_update_or_state_is_refused_by_name() -> None:
    rng = np.random.default_rng(13)
    theta = _global(rng)
    s = get_strategy("fedadam")
    with pytest.raises(ValueError, match=r"cohort 'finance', round 2.*missing \['head.bias'\]"):
        s.step("finance", 2, theta, {"layer.lora_B.weight": np.zeros((4, 3))}, s.init_state(theta))
    with pytest.raises(ValueError, match="strategy state holds.*another strategy"):
        s.step("finance", 2, theta, {k: np.zeros(v) for k, v in SHAPES.items()}, get_strategy("fedavgm").init_state(theta))
    bad = SiteUpdate("x", {"layer.lora_B.weight": np.zeros((3, 4)), "head.bias": np.zeros(5)}, 1.0)
    with pytest.raises(ValueError, match=r"site 'x'.*shape \(3, 4\)"):
        get_strategy("median").step("finance", 2, theta, [bad], {})


# ---- weights, options, refusals ----------------------------------------------------
def test_weights_live_in_the_strategy() -> None:
    assert get_strategy("fedavg").weight(1500) == 1500.0  # no cap past 1,000 examples
    assert get_strategy("fedadam").weight(7) == 7.0
    assert get_strategy("median").weight(1500) == 1.0 and get_strategy("trimmed_mean").weight(3) == 1.0
    s = get_strategy("fedavg")
    mean = s.combine([_one("a", [1.0], 1.0), _one("b", [5.0], 3.0)])
    assert mean["x"].tolist() == [4.0]
    with pytest.raises(ValueError, match="number of examples"):
        s.weight(-1)


def test_unknown_strategy_and_options_are_refused_naming_what_is_allowed() -> None:
    with pytest.raises(StrategyOptionError, match="unknown strategy 'fedsgd'; known: fedadagrad, fedadam"):
        get_strategy("fedsgd")
    with pytest.raises(ValueError, match="'fedadam' has no option lr; its options: eta, beta_1, beta_2, tau, bias_correction"):
        get_strategy("fedadam", lr=0.1)
    with pytest.raises(ValueError, match="'median' has no option beta; its options: none"):
        get_strategy("median", beta=0.1)


@pytest.mark.parametrize("name, option, value, allowed", [
    ("fedadam", "beta_1", 1.0, r"\[0.0, 1.0\)"), ("fedadam", "tau", 0, r"\(0.0, inf\)"), ("fedyogi", "eta", -1.0, r"\(0.0, inf\)"),
    ("fedadam", "bias_correction", "yes", "true or false"), ("fedavgm", "server_momentum", True, r"\[0.0, 1.0\)"),
    ("fedprox", "mu", float("nan"), r"\[0.0, inf\)"), ("trimmed_mean", "beta", 0.5, r"\[0.0, 0.5\)"),
    ("krum", "byzantine", -1, "integer >= 0"), ("multikrum", "selected", 1.5, "integer >= 0"),
    ("fedavg", "server_learning_rate", "1", r"\(0.0, inf\)"),
])
def test_bad_option_values_are_refused_naming_the_option_and_range(name: str, option: str, value, allowed: str) -> None:
    with pytest.raises(StrategyOptionError, match=f"{name}' option {option} = .*{allowed}"):
        get_strategy(name, **{option: value})


def test_each_strategies_name_the_alternative_under_secure_aggregation() -> None:
    needs = available()
    assert {n for n, v in needs.items() if v == "each"} == {"median", "trimmed_mean", "krum", "multikrum"}
    for name, v in needs.items():
        s = get_strategy(name)
        assert s.linear == (v == "sum")
        if v == "sum":
            assert s.secure_refusal() is None
        else:
            msg = s.secure_refusal()
            assert msg is not None and msg.startswith(f"{name} needs each site's update")
            assert "under secure aggregation use fedavg/fedavgm/fedprox/fedadam/fedyogi/fedadagrad" in msg


def test_the_one_call_form_is_refused_for_strategies_with_state() -> None:
    theta = {"x": np.zeros(1, np.float32)}
    with pytest.raises(FedloraError, match="'fedadam' keeps per-cohort state"):
        get_strategy("fedadam").aggregate(theta, [_one("a", [1.0])])
    assert get_strategy("trimmed_mean", beta=0.0).aggregate(theta, [_one("a", [1.0]), _one("b", [2.0])])["x"].tolist() == [1.5]


# ---- FedProx at the site ------------------------------------------------------------
def test_proximal_gradient_is_the_gradient_of_the_penalty() -> None:
    rng = np.random.default_rng(14)
    w, w0, mu, eps = rng.normal(size=6), rng.normal(size=6), 0.3, 1e-6
    grad = proximal_gradient(w, w0, mu)
    for i in range(6):
        e = np.zeros(6)
        e[i] = eps
        fd = (proximal_penalty({"w": w + e}, {"w": w0}, mu) - proximal_penalty({"w": w - e}, {"w": w0}, mu)) / (2 * eps)
        assert abs(fd - grad[i]) < 1e-6
    import torch

    t = proximal_gradient(torch.tensor(w), torch.tensor(w0), mu)  # the trainer's tensors work as they are
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), grad)
