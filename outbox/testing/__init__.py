"""Test and demo helpers that ship with the package.

* :mod:`outbox.testing.synth` - synthetic EIA-930 rows and response bodies in the real
  EIA v2 format.
* :mod:`outbox.testing.fake_eia` - a local stand-in for the EIA v2 API, with fault
  injection.
* :mod:`outbox.testing.scripted_gridpulse` - a local GridPulse stand-in whose answers a
  test scripts (the answers the reference receiver never gives).

The bundled one-day sample (synthetic, real format) lives in ``outbox/data/sample``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    """Directory of the bundled synthetic sample (EIA v2 response bodies, one per route)."""
    return Path(str(resources.files("outbox").joinpath("data", "sample")))
