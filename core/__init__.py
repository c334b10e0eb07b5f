"""fedlora: federated, privacy-preserving LoRA fine-tuning on Flower.

The distribution maps the repository's folders to subpackages:
``core/`` is ``fedlora`` (shared pieces every side imports: config, model, task, wire
format, run directory, CLI), ``server/`` is ``fedlora.server``, ``client/`` is
``fedlora.client``, ``strategies/`` is ``fedlora.strategies``, ``privacy/`` is
``fedlora.privacy`` and ``simulation/`` is ``fedlora.simulation``.
Nothing in ``fedlora`` (core) imports from the subpackages.
"""

import os as _os
import warnings as _warnings

# fedlora never fetches weights or data from a hub at run time.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# transformers 5 deprecation chatter that says nothing about fedlora's use of it
_warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")

__version__ = "0.1.0"
