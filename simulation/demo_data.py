"""SYNTHETIC demo data for the finance, medical and retail sites (generated, not real records).

Each example is one sentence built from a label's cue phrases, neutral filler shared by all
labels, sometimes a distracting cue from another label (so a keyword lookup is not enough),
and a small fraction of flipped labels. Sites of a cohort are non-IID: each draws its label
mix from a Dirichlet(label_skew) (mixed 85/15 with uniform so every label appears), and site
k of n holds ``examples_per_site * (1 - size_skew) ** (k / (n - 1))`` examples. Everything is
a pure function of (seed, domain, site index). Every row carries ``synthetic = true``.

A small run writes each site's table into the run directory (``write_cohort``); a large one names
each site's rows by ``generated_path`` instead, and they are made in memory when the site first
trains or evaluates (``fedlora.client.data.register_generator``), then let go.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.client.data import GENERATED, register_generator
from fedlora.model import derive_seed

DOMAINS: dict[str, dict[str, list[str]]] = {
    "finance": {
        "negative": ["profit fell sharply", "missed analyst expectations", "cut its full-year outlook", "reported a widening net loss",
                     "announced layoffs", "saw its shares slump", "faces weak demand", "booked an impairment charge"],
        "neutral": ["announced the appointment of a new CFO", "will publish its interim report", "held its annual general meeting",
                    "signed a framework agreement", "completed the transfer of shares", "changed its registered address",
                    "published the notice of its meeting", "confirmed the record date"],
        "positive": ["reported record revenue", "beat analyst expectations", "raised its full-year outlook", "increased its dividend",
                     "saw strong demand", "watched its shares jump", "improved its operating margin", "won a major contract"],
    },
    "medical": {
        "cardiovascular": ["myocardial infarction", "atrial fibrillation", "coronary artery disease", "heart failure",
                           "resistant hypertension", "stent thrombosis", "aortic stenosis", "ventricular arrhythmia"],
        "digestive": ["ulcerative colitis", "hepatic fibrosis", "gastric ulcer bleeding", "acute pancreatitis",
                      "inflammatory bowel disease", "liver cirrhosis", "gallstone disease", "esophageal reflux"],
        "neoplasms": ["metastatic carcinoma", "tumor progression", "adjuvant chemotherapy", "malignant melanoma",
                      "non-hodgkin lymphoma", "breast cancer recurrence", "radiotherapy response", "tumor resection margins"],
        "nervous": ["refractory epilepsy seizures", "peripheral neuropathy", "multiple sclerosis relapses", "cognitive decline",
                    "parkinson disease tremor", "migraine frequency", "spinal cord injury", "demyelinating lesions"],
    },
    "retail": {
        "sizing": ["runs two sizes small", "was far too tight in the chest", "had to size up", "fits very large",
                   "the sleeves are too long", "the waist is cut narrow", "length was too short", "sizing chart is off"],
        "quality": ["the fabric pilled after one wash", "a seam ripped open", "the color faded quickly", "feels like cheap material",
                    "the zipper broke", "stitching came loose", "buttons fell off", "the print cracked"],
        "shipping": ["arrived two weeks late", "the package was damaged", "they sent the wrong item", "tracking never updated",
                     "delivery took forever", "the box arrived empty", "it was left at the wrong address", "the return label was missing"],
        "satisfied": ["love it", "a perfect fit", "great quality for the price", "would buy again",
                      "exactly as pictured", "so comfortable", "I get compliments every time", "my new favorite piece"],
    },
}

_FILLER = {
    "finance": (["Nordbank", "Helix Corp", "Aurora Metals", "Baltic Shipping", "Vireo Telecom", "Kestrel Foods", "Orion Energy", "Tamar Retail"],
                ["in the third quarter", "in the first half", "for the fiscal year", "last month", "on Tuesday", "in 2024"],
                ["according to a statement", "the company said", "in a stock exchange release", "analysts noted", "", ""]),
    "medical": (["In a cohort of adults,", "In this randomized trial,", "Among elderly patients,", "In a retrospective study,",
                 "In a multicenter analysis,", "Among 240 participants,"],
                ["outcomes were assessed", "the primary endpoint was evaluated", "follow-up lasted two years", "risk factors were compared",
                 "treatment response was measured", "mortality was recorded"],
                ["in patients with", "for individuals presenting with", "in those diagnosed with", "after treatment of"]),
    "retail": (["This dress", "The jacket", "These jeans", "The blouse", "This sweater", "The skirt", "My order", "This top"],
               ["honestly", "to be fair", "overall", "unfortunately", "as expected", "I must say"],
               ["I ordered it for a wedding.", "Bought it on sale.", "Second time ordering here.", "Got it as a gift.", "", ""]),
}

LABELS: dict[str, list[str]] = {d: list(v) for d, v in DOMAINS.items()}


def _sentence(domain: str, label: str, rng: np.random.Generator, distractor_rate: float) -> str:
    cues = DOMAINS[domain][label]
    a, b, c = _FILLER[domain]
    cue = cues[rng.integers(len(cues))]
    if rng.random() < distractor_rate:
        others = [lab for lab in DOMAINS[domain] if lab != label]
        other = others[rng.integers(len(others))]
        ocues = DOMAINS[domain][other]
        cue = f"{cue}, although earlier it {ocues[rng.integers(len(ocues))]}" if domain != "medical" \
            else f"{cue} with a history of {ocues[rng.integers(len(ocues))]}"
    if domain == "finance":
        text = f"{a[rng.integers(len(a))]} {cue} {b[rng.integers(len(b))]}, {c[rng.integers(len(c))]}".rstrip(", ") + "."
    elif domain == "medical":
        text = f"{a[rng.integers(len(a))]} {b[rng.integers(len(b))]} {c[rng.integers(len(c))]} {cue}."
    else:
        text = f"{a[rng.integers(len(a))]} {cue}, {b[rng.integers(len(b))]}. {c[rng.integers(len(c))]}".strip()
    return text


def site_size(site_index: int, n_sites: int, examples_per_site: int, size_skew: float) -> int:
    """Example count of site ``site_index`` of ``n_sites``: ``examples_per_site`` down by the size skew (at least 20)."""
    if n_sites == 1:
        return examples_per_site
    return max(20, int(round(examples_per_site * (1 - size_skew) ** (site_index / (n_sites - 1)))))


def site_sizes(n_sites: int, examples_per_site: int, size_skew: float) -> list[int]:
    """Example counts of a cohort's sites, from ``examples_per_site`` down by the size skew."""
    return [site_size(k, n_sites, examples_per_site, size_skew) for k in range(n_sites)]


def generate_site(domain: str, site_index: int, n_sites: int, *, seed: int, examples_per_site: int = 240,
                  size_skew: float = 0.5, label_skew: float = 1.0, distractor_rate: float = 0.3, label_noise: float = 0.08) -> pd.DataFrame:
    """One site's synthetic table with columns ``text``, ``label``, ``synthetic``."""
    if domain not in DOMAINS:
        raise ValueError(f"no demo data for domain {domain!r}; known: {', '.join(DOMAINS)}")
    labels = LABELS[domain]
    rng = np.random.default_rng(derive_seed(seed, "demo", domain, site_index))
    n = site_size(site_index, n_sites, examples_per_site, size_skew)
    mix = 0.85 * rng.dirichlet(np.full(len(labels), label_skew)) + 0.15 / len(labels)
    ys = rng.choice(len(labels), size=n, p=mix)
    texts = [_sentence(domain, labels[y], rng, distractor_rate) for y in ys]
    flip = rng.random(n) < label_noise
    ys = np.where(flip, rng.integers(len(labels), size=n), ys)
    return pd.DataFrame({"text": texts, "label": [labels[y] for y in ys], "synthetic": True})


def generated_path(domain: str, site_index: int, n_sites: int, *, seed: int, examples_per_site: int, size_skew: float,
                   label_skew: float) -> str:
    """The data path of a site whose rows ``generate_site`` makes in memory when the site reads them
    (``generated:demo/<domain>/<index>/<sites>/<seed>/<examples>/<size skew>/<label skew>``)."""
    return f"{GENERATED}demo/{domain}/{site_index}/{n_sites}/{seed}/{examples_per_site}/{float(size_skew)!r}/{float(label_skew)!r}"


def _generate_from(spec: str) -> pd.DataFrame:
    """``generate_site`` for the part of a ``generated_path`` after ``generated:demo/``."""
    parts = spec.split("/")
    if len(parts) != 7:
        raise ValueError(f"a demo site is named by domain/index/sites/seed/examples/size_skew/label_skew, not {spec!r}")
    domain, index, n_sites, seed, examples, size_skew, label_skew = parts
    if not 0 <= int(index) < int(n_sites):
        raise ValueError(f"site index {index} of a cohort of {n_sites} sites")
    return generate_site(domain, int(index), int(n_sites), seed=int(seed), examples_per_site=int(examples),
                         size_skew=float(size_skew), label_skew=float(label_skew))


register_generator("demo", _generate_from)


def write_cohort(directory: Path, domain: str, n_sites: int, *, seed: int, examples_per_site: int, size_skew: float,
                 label_skew: float) -> list[Path]:
    """Write ``<domain>-<k>.synthetic.csv`` for each site; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_sites):
        df = generate_site(domain, k, n_sites, seed=seed, examples_per_site=examples_per_site, size_skew=size_skew, label_skew=label_skew)
        path = directory / f"{domain}-{k + 1}.synthetic.csv"
        df.to_csv(path, index=False)
        paths.append(path)
    return paths
