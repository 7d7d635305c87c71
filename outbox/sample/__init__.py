"""What ``outbox demo`` ships: the bundled sample and the local receiver it runs.

* :func:`sample_dir` - one synthetic day of EIA-930 data in the real EIA v2 format
  (``outbox/sample/data``, one response body per route), for the demo, ``fetch --replay``
  and the stand-in EIA's ``--sample``.
* :mod:`outbox.sample.receiver` - the reference receiver run as a local subprocess.

The sample was written by ``outbox.testing.synth`` (see ``data/README.md``); nothing here
imports the test peers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

# The sample's day: 24 hours from 2025-08-21T00Z (``python -m outbox.testing.synth``'s default).
SAMPLE_START = datetime(2025, 8, 21, tzinfo=UTC)
SAMPLE_HOURS = 24


def sample_dir() -> Path:
    """Directory of the bundled synthetic sample (EIA v2 response bodies, one per route)."""
    return Path(str(resources.files("outbox.sample").joinpath("data")))
