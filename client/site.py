"""What a site is: its name, cohort (domain) and where its private data lives.

In deployment these come from the SuperNode's node config (they never leave the site); in
simulation the engine hands each virtual site one ``SiteSpec`` by partition id.

Its secure-aggregation signing material (``signing_key``, ``certificate``, ``ca``: PEM or
OpenSSH text) makes its ``credentials`` (``fedlora.privacy.key_signing``): with key and
certificate its SecAgg keys go out signed; with the CA it requires its peers' keys signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError, FedloraError
from fedlora.privacy.key_signing import Credentials
from fedlora.privacy.policy import SitePolicy
from fedlora.tasks.base import SiteColumns


def _flag(value: Any, key: str) -> bool:
    """A yes/no node config value: a bool, or "true"/"false" (also 1/0, yes/no); anything else is refused."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{key} = {value!r} must be true or false")


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
    data_path: str  # its data file; in a large simulation a ``generated:`` path (rows made in memory, ``fedlora.client.data``)
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = ""  # instruction data (causal_lm): prompt/response columns, or a messages column
    response_column: str = ""
    messages_column: str = ""
    rows: tuple[int, ...] = ()  # this site's rows of data_path (0-based data rows; simulation splits one file); () = all rows
    state_dir: str = ""  # where the site keeps what must outlive its process (its privacy ledger); "" = memory only
    model: str = ""  # the base model this site holds (path or packaged name); "" = the one the coordinator names
    device: str = ""  # this site's device (auto, cpu, cuda, cuda:N); "" = the process default
    lora_rank: int = 0  # the LoRA rank this site trains (its compute budget; <= the cohort's, frozen_a only); 0 = the cohort's
    policy: SitePolicy = field(default_factory=SitePolicy)  # the site's own privacy policy (fedlora.privacy.policy)
    identity: str = ""  # the site's key identity (deployment: its public key's fingerprint); "" = sim:<name>
    signing_key: str = field(default="", repr=False)  # its EC P-256 (or P-384) private key (PEM or OpenSSH text); "" = none
    certificate: str = ""  # its certificate from the federation CA, CN = name (PEM); "" = none
    ca: str = ""  # the federation CA certificate (PEM); "" = peers' SecAgg keys are not checked

    @property
    def columns(self) -> SiteColumns:
        """The columns the task reads from this site's file."""
        return SiteColumns(self.text_column, self.label_column, self.prompt_column, self.response_column, self.messages_column)

    @property
    def key_identity(self) -> str:
        """Whom the site's ledger is keyed by: its key, never its self-chosen name."""
        return self.identity or f"sim:{self.name}"

    @property
    def credentials(self) -> Credentials | None:
        """Its secure-aggregation signing material, or None when it has none at all."""
        if not (self.signing_key or self.certificate or self.ca):
            return None
        return Credentials(self.name, self.signing_key, self.certificate, self.ca)

    def to_dict(self) -> dict[str, Any]:
        """Its fields, the private signing key left out."""
        return {k: v for k, v in asdict(self).items() if k != "signing_key"}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSpec:
        """Read a deployed site's spec from SuperNode node config keys
        ``site-name``, ``domain``, ``data-path``, ``text-column``, ``label-column``, ``prompt-column``,
        ``response-column``, ``messages-column``, ``state-dir``,
        ``model``, ``device``, ``lora-rank`` (the rank this site trains, ``ModelSpec.at_rank``), ``identity``, the policy: ``epsilon``, ``delta``, ``accountant``,
        ``eval-metrics``, ``public-size``, ``allow-clear-aggregation`` (default false: the site
        requires secure aggregation and never sends an update or a metric in the clear), and the paths of the signing material (read here):
        ``signing-key`` (the site's ``.key``), ``cert`` (its ``.crt``), ``ca`` (``ca.pem``); key
        and certificate come together or not at all. Reproducible noise is never read from
        here: it exists in simulation only."""
        missing = [k for k in ("domain", "data-path") if not node_config.get(k)]
        if missing:
            raise ConfigError("node-config", dict(node_config), f"a site needs {', '.join(missing)} in its node config")
        domain = str(node_config["domain"])
        state_dir = str(node_config.get("state-dir", ""))
        try:
            policy = SitePolicy(epsilon=float(node_config.get("epsilon", 0.0)), max_delta=float(node_config.get("delta", 0.0)),
                                accountant=str(node_config.get("accountant", "")),
                                eval_metrics=str(node_config.get("eval-metrics", "site")),
                                public_size=_whole(node_config.get("public-size", 0), "public-size"), persistent=bool(state_dir),
                                require_secure_aggregation=not _flag(node_config.get("allow-clear-aggregation", False),
                                                                     "allow-clear-aggregation"))
        except (ValueError, FedloraError) as e:
            raise ConfigError("node-config", dict(node_config), f"the site's privacy policy: {e}") from None
        try:
            lora_rank = _whole(node_config.get("lora-rank", 0), "lora-rank")
        except ValueError as e:
            raise ConfigError("node-config", dict(node_config), f"the site's LoRA rank: {e}") from None
        if "lora-rank" in node_config and lora_rank < 1:
            raise ConfigError("lora-rank", node_config["lora-rank"], "must be a LoRA rank >= 1 (at most the cohort's lora.rank)")
        return cls(name=str(node_config.get("site-name") or domain), cohort=domain, data_path=str(node_config["data-path"]),
                   text_column=str(node_config.get("text-column", "text")), label_column=str(node_config.get("label-column", "label")),
                   prompt_column=str(node_config.get("prompt-column", "")), response_column=str(node_config.get("response-column", "")),
                   messages_column=str(node_config.get("messages-column", "")),
                   state_dir=state_dir,
                   model=str(node_config.get("model", "")), device=str(node_config.get("device", "")), lora_rank=lora_rank, policy=policy,
                   identity=str(node_config.get("identity", "")), **_signing_material(node_config))


def _signing_material(node_config: Mapping[str, Any]) -> dict[str, str]:
    """``signing_key``, ``certificate`` and ``ca`` read from the files the node config names."""
    paths = {field_: str(node_config.get(key, "")) for field_, key in (("signing_key", "signing-key"), ("certificate", "cert"),
                                                                       ("ca", "ca"))}
    if bool(paths["signing_key"]) != bool(paths["certificate"]):
        raise ConfigError("node-config", dict(node_config), "signing-key and cert name the site's key and its certificate: give both or neither")
    out = {}
    for field_, path in paths.items():
        if path:
            try:
                out[field_] = Path(path).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError("node-config", path, f"the site's {field_.replace('_', ' ')} file cannot be read: {e}") from None
    return out
