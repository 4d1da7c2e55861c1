"""Prefect deployments: the ones ``prefect.yaml`` declares, the finetune trigger, the local worker, ad-hoc runs.

One module per job:

* :mod:`.project` reads ``prefect.yaml`` and registers its deployments (``embed-factory deploy``);
* :mod:`.finetune_trigger` builds the ``finetune/finetune`` deployment with the event trigger that
  starts a fine-tune when a ``clean`` flow run completes, and registers it on a work pool;
* :mod:`.serving` runs them on this machine: ``prefect.serve`` for the finetune deployment
  (``embed-factory serve``) and a process worker for a work pool (``embed-factory deploy``);
* :mod:`.runs` starts one deployment run with ``--param`` values checked against its schema
  (``embed-factory trigger``).

The Prefect API is the current one (``PREFECT_API_URL``; the CLI sets it). This package imports
nothing heavy at import time: Prefect and the flows load inside the functions that need them.
"""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deployment cannot be served, registered or run as asked (the message says why)."""
