"""The reference GridPulse receiver: a reference implementation and test peer.

It implements GridPulse ingest API v1 exactly as ``shared/contracts/gridpulse-ingest-v1.md``
and ``outbox/openapi.yaml`` describe it, for the demo, for end-to-end and crash tests, and
as the executable spec for the GridPulse team. It is not GridPulse and not our outbox.

* :func:`create_app` - the Starlette app (``app.py``)
* :func:`serve` - uvicorn runner (``server.py``); also ``python -m outbox.receiver``
* :func:`seed_catalog` - fill the series catalogue for ``catalog="fixed"`` (``db.py``)
* :class:`Faults` - fault injection parsed from ``--fault SPEC`` (``faults.py``)
"""

from __future__ import annotations

from outbox.receiver.app import create_app
from outbox.receiver.db import seed_catalog
from outbox.receiver.faults import Faults
from outbox.receiver.server import serve

__all__ = ["Faults", "create_app", "seed_catalog", "serve"]
