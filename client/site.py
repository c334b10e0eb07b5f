"""What a site is: its name, cohort (domain) and where its private data lives.

In deployment these come from the SuperNode's node config (they never leave the site); in
simulation the engine hands each virtual site one ``SiteSpec`` by partition id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedlora.errors import ConfigError, FedloraError
from fedlora.privacy.policy import SitePolicy
from fedlora.tasks.base import SiteColumns


def _whole(value: Any, key: str) -> int:
    """A whole number from a node config value (``2.7`` or ``"2.7"`` is refused, not truncated)."""
    f = float(value)
    if f != int(f):
        raise ValueError(f"{key} = {value!r} must be a whole number")
    return int(f)


@dataclass(frozen=True)
class SiteSpec:
    name: str
    cohort: str
    data_path: str
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = ""  # instruction data (causal_lm): prompt/response columns, or a messages column
    response_column: str = ""
    messages_column: str = ""
    rows: tuple[int, ...] = ()  # this site's rows of data_path (0-based data rows; simulation splits one file); () = all rows
    state_dir: str = ""  # where the site keeps what must outlive its process (its privacy ledger); "" = memory only
    model: str = ""  # the base model this site holds (path or packaged name); "" = the one the coordinator names
    device: str = ""  # this site's device (auto, cpu, cuda, cuda:N); "" = the process default
    policy: SitePolicy = field(default_factory=SitePolicy)  # the site's own privacy policy (fedlora.privacy.policy)
    identity: str = ""  # the site's key identity (deployment: its public key's fingerprint); "" = sim:<name>

    @property
    def columns(self) -> SiteColumns:
        """The columns the task reads from this site's file."""
        return SiteColumns(self.text_column, self.label_column, self.prompt_column, self.response_column, self.messages_column)

    @property
    def key_identity(self) -> str:
        """Whom the site's ledger is keyed by: its key, never its self-chosen name."""
        return self.identity or f"sim:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSpec:
        """Read a deployed site's spec from SuperNode node config keys
        ``site-name``, ``domain``, ``data-path``, ``text-column``, ``label-column``, ``prompt-column``,
        ``response-column``, ``messages-column``, ``state-dir``,
        ``model``, ``device``, ``identity`` and the policy: ``epsilon``, ``delta``, ``accountant``,
        ``eval-metrics``, ``public-size``. Reproducible noise is never read from here: it exists
        in simulation only."""
        missing = [k for k in ("domain", "data-path") if not node_config.get(k)]
        if missing:
            raise ConfigError("node-config", dict(node_config), f"a site needs {', '.join(missing)} in its node config")
        domain = str(node_config["domain"])
        state_dir = str(node_config.get("state-dir", ""))
        try:
            policy = SitePolicy(epsilon=float(node_config.get("epsilon", 0.0)), max_delta=float(node_config.get("delta", 0.0)),
                                accountant=str(node_config.get("accountant", "")),
                                eval_metrics=str(node_config.get("eval-metrics", "site")),
                                public_size=_whole(node_config.get("public-size", 0), "public-size"), persistent=bool(state_dir))
        except (ValueError, FedloraError) as e:
            raise ConfigError("node-config", dict(node_config), f"the site's privacy policy: {e}") from None
        return cls(name=str(node_config.get("site-name") or domain), cohort=domain, data_path=str(node_config["data-path"]),
                   text_column=str(node_config.get("text-column", "text")), label_column=str(node_config.get("label-column", "label")),
                   prompt_column=str(node_config.get("prompt-column", "")), response_column=str(node_config.get("response-column", "")),
                   messages_column=str(node_config.get("messages-column", "")),
                   state_dir=state_dir,
                   model=str(node_config.get("model", "")), device=str(node_config.get("device", "")), policy=policy,
                   identity=str(node_config.get("identity", "")))
