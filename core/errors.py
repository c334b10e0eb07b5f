"""Errors that reach the user: each names the problem, and the CLI maps each to an exit code."""

from __future__ import annotations

# ``Error.code`` values of fedlora's error replies (site -> coordinator)
SITE_ERROR_CODE = 4201  # the site refused the message (bad data, wrong cohort, bad payload, ...)
BUDGET_EXHAUSTED_CODE = 4202  # the round would exceed the site's privacy budget
POLICY_REFUSED_CODE = 4203  # the coordinator asked for less privacy than the site's policy allows
PROTOCOL_ERROR_CODE = 4204  # the message is malformed (a key missing, of the wrong type, unknown)
DATA_MISMATCH_CODE = 4205  # the site's data does not fit its cohort (labels, columns): details stay in the site's own log
UNKNOWN_COHORT_CODE = 4206  # the site's cohort (--domain) is not one of this federation's
ADAPTER_NOT_HELD_CODE = 4207  # the message names an adapter by digest that the site does not hold: send it in full

INCOMPLETE_EXIT = 10  # the run finished, but some cohort was skipped (too few sites for secure aggregation)


class FedloraError(Exception):
    """Base of every error fedlora reports to a user (printed as one line, non-zero exit)."""

    exit_code = 1


class ConfigError(FedloraError):
    """A run configuration is invalid; the message names the key and the bad value."""

    exit_code = 2

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config: {key} = {value!r}: {expected}")


class DataError(FedloraError):
    """A site's data file cannot be used; the message names the file (and row, column)."""

    exit_code = 3


class UnknownCohort(FedloraError):
    """A site's cohort (``--domain``) is not one of those the coordinator trains."""

    exit_code = 3


class ModelError(FedloraError):
    """The base model or the LoRA setup cannot be used."""

    exit_code = 4


class WireError(FedloraError):
    """An adapter payload is malformed: wrong keys, shapes, dtype or non-finite values."""

    exit_code = 5


class FederationError(FedloraError):
    """A round cannot complete (every site of a cohort failed, no sites connected, ...)."""

    exit_code = 6


class DeploymentError(FedloraError):
    """A deployment cannot start or connect: the coordinator's processes, an unreachable
    coordinator, certificates or keys it refuses."""

    exit_code = 9


class ProtocolError(FedloraError):
    """A message does not follow ``fedlora.protocol``: a key missing, of the wrong type, or unknown."""

    exit_code = 5


class RunIncomplete(FedloraError):
    """The run finished and wrote everything, but some cohort was skipped (named in the message,
    in ``summary.json`` and in ``metrics.jsonl``): it trained nothing."""

    exit_code = INCOMPLETE_EXIT


class RunInterrupted(FedloraError):
    """The run was interrupted (Ctrl-C); its directory keeps the last checkpoint."""

    exit_code = 130


class AdapterNotHeld(FedloraError):
    """A message names its adapter only by digest, and this site does not hold that adapter
    (it restarted, or its cache let it go): the coordinator resends the message in full."""
