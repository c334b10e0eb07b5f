"""What a site is: its name, cohort (domain) and where its private data lives.

In deployment these come from the SuperNode's node config (they never leave the site); in
simulation the engine hands each virtual site one ``SiteSpec`` by partition id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedlora.errors import ConfigError


@dataclass(frozen=True)
class SiteSpec:
    name: str
    cohort: str
    data_path: str
    text_column: str = "text"
    label_column: str = "label"
    shard_index: int = 0  # this site's part of data_path (simulation splits one file across sites)
    shard_count: int = 1
    budget_epsilon: float = 0.0  # this site's own DP budget; 0: the coordinator's default
    state_dir: str = ""  # where the site keeps what must outlive its process (its privacy ledger); "" = memory only
    model: str = ""  # the base model this site holds (path or packaged name); "" = the one the coordinator names
    device: str = ""  # this site's device (auto, cpu, cuda, cuda:N); "" = the process default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSpec:
        """Read a deployed site's spec from SuperNode node config keys
        ``site-name``, ``domain``, ``data-path``, ``text-column``, ``label-column``, ``epsilon``, ``state-dir``,
        ``model``, ``device``."""
        missing = [k for k in ("domain", "data-path") if not node_config.get(k)]
        if missing:
            raise ConfigError("node-config", dict(node_config), f"a site needs {', '.join(missing)} in its node config")
        domain = str(node_config["domain"])
        return cls(name=str(node_config.get("site-name") or domain), cohort=domain, data_path=str(node_config["data-path"]),
                   text_column=str(node_config.get("text-column", "text")), label_column=str(node_config.get("label-column", "label")),
                   budget_epsilon=float(node_config.get("epsilon", 0.0)), state_dir=str(node_config.get("state-dir", "")),
                   model=str(node_config.get("model", "")), device=str(node_config.get("device", "")))
