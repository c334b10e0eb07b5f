from __future__ import annotations

import numpy as np
import pandas as pd

from fedlora.simulation.demo_data import DOMAINS, LABELS, generate_site, site_sizes


def test_demo_data_is_deterministic_by_seed_and_marked_synthetic() -> None:
    a = generate_site("finance", 1, 3, seed=4)
    b = generate_site("finance", 1, 3, seed=4)
    c = generate_site("finance", 1, 3, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert not a["text"].equals(c["text"])
    assert a["synthetic"].all()
    assert set(a["label"]) <= set(LABELS["finance"])


def test_sites_are_non_iid_in_size_and_label_mix() -> None:
    sizes = site_sizes(3, 240, 0.5)
    assert sizes == [240, 170, 120]
    mixes = []
    for k in range(3):
        df = generate_site("retail", k, 3, seed=0, examples_per_site=240, size_skew=0.5, label_skew=0.5)
        assert len(df) == sizes[k]
        mixes.append(df["label"].value_counts(normalize=True).reindex(LABELS["retail"], fill_value=0).to_numpy())
    # total-variation distance between the label mixes of two sites
    tv = max(0.5 * np.abs(mixes[i] - mixes[j]).sum() for i in range(3) for j in range(i + 1, 3))
    assert tv > 0.2


def test_demo_data_is_learnable_but_a_keyword_lookup_is_not_enough() -> None:
    for domain in DOMAINS:
        df = generate_site(domain, 0, 1, seed=0, examples_per_site=2000, label_skew=50.0)
        hits = 0
        for text, label in zip(df["text"], df["label"]):
            # predict the label whose cue phrase appears first in the text
            found = sorted((text.find(cue), lab) for lab, cues in DOMAINS[domain].items() for cue in cues if cue in text)
            hits += bool(found) and found[0][1] == label
        acc = hits / len(df)
        majority = df["label"].value_counts(normalize=True).max()
        assert majority < 0.5 and 0.75 < acc < 0.97, (domain, acc, majority)
