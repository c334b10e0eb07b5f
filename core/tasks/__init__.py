"""The learning tasks: one file each, registered here by name (``task.kind``).

``fedlora.tasks.base`` says what a task provides; adding a task is one file plus its entry in
``TASKS``. The coordinator, the strategies, privacy and secure aggregation ask the task (never
branch on its name).
"""

from __future__ import annotations

from typing import Any

from fedlora.errors import ConfigError

from .base import EncodedExamples, EvalResult, LabelledTexts, SiteColumns, Task
from .causal_lm import CausalLM
from .classification import SequenceClassification

TASKS: dict[str, type] = {"sequence_classification": SequenceClassification, "causal_lm": CausalLM}


def get_task(name: str) -> Task:
    """Return the task registered under ``name``; unknown names list the known ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ConfigError("task.kind", name, f"unknown task; known: {', '.join(TASKS)}") from None


def task_defaults(name: str, dp: bool) -> dict[str, dict[str, Any]] | None:
    """The config sections' values a task sets where the config leaves them unset (under DP or
    without); None for a task without defaults of its own (the config's apply)."""
    defaults = getattr(TASKS.get(name), "defaults", None)
    if not defaults:
        return None
    return {k: dict(v) for k, v in defaults.get("dp" if dp else "no_dp", {}).items()}


__all__ = ["TASKS", "EncodedExamples", "EvalResult", "LabelledTexts", "SiteColumns", "Task", "get_task", "task_defaults"]
