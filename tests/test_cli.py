"""The `fedlora` command as a user runs it: exit codes, messages, nothing written on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FEDLORA, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_label_outside_the_cohort_list_exits_3_names_the_row_and_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "fin.csv"
    bad.write_text("text,label\nshares up,positive\nshares down,terrible\nflat,neutral\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nsource = "{tiny_model}"\n[cohorts.finance]\nsites = 1\ndata = "{bad}"\n'
                   'labels = ["negative", "neutral", "positive"]\n')
    out = tmp_path / "run"
    p = _run("simulate", "--config", str(cfg), "--out", str(out), cwd=tmp_path)
    assert p.returncode == 3, p.stderr
    assert "fin.csv: row 2, column 'label': label 'terrible' is not in the cohort's labels [negative, neutral, positive]" in p.stderr
    assert not out.exists()


def test_missing_column_and_bad_config_value(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("body,label\nshares up,positive\nshares down,negative\n")
    p = _run("simulate", "--model", str(tiny_model), "--data", f"finance={data}", "--out", str(tmp_path / "r1"), cwd=tmp_path)
    assert p.returncode == 3 and "no text column 'text'; columns present: body, label" in p.stderr
    p = _run("simulate", "--model", str(tiny_model), "--rounds", "0", "--out", str(tmp_path / "r2"), cwd=tmp_path)
    assert p.returncode == 2 and "train.rounds = 0" in p.stderr
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_quiet_simulation_prints_the_summary_json(tiny_model: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nsource = "{tiny_model}"\nmax_length = 32\n[train]\nrounds = 1\nlocal_steps = 2\n'
                   '[demo]\nexamples_per_site = 30\n[cohorts.retail]\nsites = 2\n')
    # 2 sites: below secure_aggregation.min_sites, so the cohort runs only when clear aggregation is allowed
    p = _run("simulate", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet", "--allow-clear-aggregation", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 1 and list(summary["cohorts"]) == ["retail"]
    assert (tmp_path / "run" / "adapters" / "retail" / "adapter_config.json").is_file()
    assert "rounds:" not in p.stderr, "--quiet shows no progress bar"
