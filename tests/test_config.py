from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.cli import _parser, simulate_config
from fedlora.config import RunConfig, apply_overrides, config_from_dict, load_config
from fedlora.errors import ConfigError


def test_defaults_are_the_demo_federation() -> None:
    cfg = RunConfig()
    assert [c.name for c in cfg.cohorts] == ["finance", "medical", "retail"]
    assert cfg.total_sites == 9
    assert cfg.model.source == "packaged:all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    ("doc", "key", "value"),
    [
        ({"lora": {"rank": 0}}, "lora.rank", 0),
        ({"lora": {"mode": "both"}}, "lora.mode", "both"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout", 1.5),
        ({"lora": {"target_modules": []}}, "lora.target_modules", ()),
        ({"train": {"rounds": -1}}, "train.rounds", -1),
        ({"train": {"learning_rate": 0.0}}, "train.learning_rate", 0.0),
        ({"train": {"rounds": "five"}}, "train.rounds", "five"),
        ({"train": {"eval_fraction": 1.0}}, "train.eval_fraction", 1.0),
        ({"federation": {"engine": "spark"}}, "federation.engine", "spark"),
        ({"federation": {"wire_dtype": "int8"}}, "federation.wire_dtype", "int8"),
        ({"model": {"device": "tpu"}}, "model.device", "tpu"),
        ({"model": {"dtype": "float64"}}, "model.dtype", "float64"),
        ({"cohorts": {"finance": {"sites": 0}}}, "cohorts.finance.sites", 0),
        ({"cohorts": {"finance": {"labels": ["a", "a"]}}}, "cohorts.finance.labels", ("a", "a")),
        ({"cohorts": {"legal": {}}}, "cohorts.legal", "legal"),
        ({"cohorts": {"Bad-Name": {"data": "x.csv"}}}, "cohorts.Bad-Name", "Bad-Name"),
        ({"seed": -3}, "seed", -3),
    ],
)
def test_every_error_names_key_and_value(doc: dict, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc)
    assert err.value.key == key
    assert err.value.value == value
    assert key in str(err.value) and repr(value) in str(err.value)


def test_unknown_keys_are_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"train\.round\b.*unknown key.*rounds"):
        config_from_dict({"train": {"round": 3}})
    with pytest.raises(ConfigError, match=r"^config: colors = .*unknown key"):
        config_from_dict({"colors": 1})


def test_toml_file_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[train]\nrounds = 7\nlocal_steps = 5\n[cohorts.finance]\nsites = 4\nlabels = ["neg", "neu", "pos"]\n')
    doc = load_config(path)
    before = repr(doc)
    merged = apply_overrides(doc, {"train.rounds": 2, "train.batch_size": None, "cohorts.*.sites": 5})
    assert repr(doc) == before, "overrides must not mutate the caller's dict"
    cfg = config_from_dict(merged)
    assert (cfg.seed, cfg.train.rounds, cfg.train.local_steps) == (3, 2, 5)
    assert cfg.cohort("finance").sites == 5 and cfg.cohort("finance").labels == ("neg", "neu", "pos")
    assert [c.name for c in cfg.cohorts] == ["finance"]


def test_bad_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 1\n")
    with pytest.raises(ConfigError, match="bad.toml.*not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_data_flags_run_exactly_the_named_cohorts(tmp_path: Path) -> None:
    args = _parser().parse_args(["simulate", "--data", "finance=/x/fin.csv", "--data", "legal=/x/law.csv",
                                 "--sites", "2", "--text-column", "body", "--rounds", "1"])
    cfg = simulate_config(args)
    assert [c.name for c in cfg.cohorts] == ["finance", "legal"]
    assert all(c.sites == 2 and c.text_column == "body" for c in cfg.cohorts)
    assert cfg.cohort("legal").data == "/x/law.csv"


def test_config_round_trips_through_its_dict() -> None:
    cfg = config_from_dict({"lora": {"rank": 2, "target_modules": ["query"]}, "cohorts": {"medical": {"sites": 2}}})
    assert config_from_dict({k: v for k, v in cfg.to_dict().items()}) == cfg


def test_dp_is_on_by_default_and_the_defaults_follow_the_mode() -> None:
    from fedlora.config import NO_DP_DEFAULTS

    dp = config_from_dict({})
    assert dp.privacy.dp and dp.privacy.epsilon == 8.0 and dp.secure_aggregation.enabled
    assert (dp.lora.mode, dp.train.optimizer, dp.train.momentum) == ("probe", "sgd", 0.9)
    plain = config_from_dict({"privacy": {"dp": False}})
    for section, values in NO_DP_DEFAULTS.items():
        assert {k: getattr(getattr(plain, section), k) for k in values} == values
    mine = config_from_dict({"privacy": {"dp": False}, "train": {"batch_size": 32}, "lora": {"mode": "frozen_a"}})
    assert mine.train.batch_size == 32 and mine.lora.mode == "frozen_a" and mine.train.optimizer == "adamw"
    assert config_from_dict(plain.to_dict()) == plain and config_from_dict(dp.to_dict()) == dp  # config.toml reloads the same run
