"""The same config and seed give the same final adapters in-process and on Flower's Ray engine,
with one cohort under secure aggregation (3 sites) and one in the clear (2 sites). The Ray side
runs on a Ray cluster that is already running (``ray start --head`` on this machine, as a user
with several machines would start one per machine), reached by ``federation.ray_address``
(``--ray-address``; or ``RAY_ADDRESS``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedlora.errors import ConfigError
from fedlora.simulation.runner import ray_init_args, simulate

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster of this machine (``ray start --head``), stopped afterwards."""
    if not RAY.exists():
        pytest.skip(f"{RAY} is absent (flwr[simulation] installs Ray)")
    port, temp = _free_port(), Path("/tmp") / f"ray-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}"],
                             env=env, capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        pytest.fail(f"ray start --head failed: {started.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _jobs(address: str) -> int:
    """Drivers the cluster has seen (this query is one, and so is a connected ``fedlora simulate``)."""
    code = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); from ray._private.state import state;"
            "print(json.dumps(len(state.job_table())))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_inprocess_and_ray_engines_give_the_same_adapters(make_config, tmp_path: Path, ray_cluster: str) -> None:
    # Ray gives each actor OMP_NUM_THREADS = its CPUs; with the in-process engine's torch thread
    # count on both sides the floating-point reductions match, and the adapters are bit-identical.
    threads = float(torch.get_num_threads())
    runs = {}
    before = _jobs(ray_cluster)
    for engine in ("inprocess", "ray"):
        on_cluster = {"ray_address": ray_cluster} if engine == "ray" else {}
        cfg = make_config(tmp_path / engine, federation={"engine": engine, "ray_cpus_per_site": threads, **on_cluster},
                          cohorts={"finance": {"sites": 3}, "medical": {"sites": 2}})
        runs[engine], _ = simulate(cfg, progress=False)
    assert _jobs(ray_cluster) == before + 2  # the Ray run was a job of that cluster (and this query another), not a Ray of its own
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


def test_the_ray_engine_connects_to_a_cluster_by_flag_or_environment(make_config, tmp_path: Path) -> None:
    local = make_config(tmp_path / "a", federation={"engine": "ray"})
    assert ray_init_args(local, {}) == {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    assert ray_init_args(local, {"RAY_ADDRESS": "10.0.0.5:6379"}) == {"address": "10.0.0.5:6379", "include_dashboard": False}
    flagged = make_config(tmp_path / "b", federation={"engine": "ray", "ray_address": "10.0.0.7:6379"})
    assert ray_init_args(flagged, {"RAY_ADDRESS": "10.0.0.5:6379"})["address"] == "10.0.0.7:6379"  # the flag wins
    with pytest.raises(ConfigError, match="federation.ray_address"):
        make_config(tmp_path / "c", federation={"ray_address": "127.0.0.1:6379"})  # without the Ray engine
