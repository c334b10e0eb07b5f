"""The same config and seed give the same final adapters in-process and on Flower's Ray engine,
with one cohort under secure aggregation (3 sites) and one in the clear (2 sites)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedlora.simulation.runner import simulate


def test_inprocess_and_ray_engines_give_the_same_adapters(make_config, tmp_path: Path) -> None:
    # Ray gives each actor OMP_NUM_THREADS = its CPUs; with the in-process engine's torch thread
    # count on both sides the floating-point reductions match, and the adapters are bit-identical.
    threads = float(torch.get_num_threads())
    runs = {}
    for engine in ("inprocess", "ray"):
        cfg = make_config(tmp_path / engine, federation={"engine": engine, "ray_cpus_per_site": threads},
                          cohorts={"finance": {"sites": 3}, "medical": {"sites": 2}})
        runs[engine], _ = simulate(cfg, progress=False)
    for cohort in ("finance", "medical"):
        a = load_file(str(runs["inprocess"] / "adapters" / cohort / "adapter_model.safetensors"))
        b = load_file(str(runs["ray"] / "adapters" / cohort / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{cohort}: {k}")
        assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)
    sa, sb = (json.loads((runs[e] / "summary.json").read_text()) for e in ("inprocess", "ray"))
    # equal up to the DER encodings of the signed secure-aggregation keys (each run's CA and signatures are fresh)
    assert [sa["bytes_up"], sa["bytes_down"]] == pytest.approx([sb["bytes_up"], sb["bytes_down"]], rel=1e-3)
    assert sa["cohorts"]["finance"]["accuracy"] == sb["cohorts"]["finance"]["accuracy"]
    # secure sums are exact integer sums: the masks cancel whatever each engine drew
    assert sa["cohorts"]["finance"]["secure_aggregation"] is sb["cohorts"]["finance"]["secure_aggregation"] is True
    assert sb["cohorts"]["medical"]["secure_aggregation"] is False
