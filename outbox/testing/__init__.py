"""Test peers that ship with the package (the product never imports them).

* :mod:`outbox.testing.synth` - synthetic EIA-930 rows and response bodies in the real
  EIA v2 format.
* :mod:`outbox.testing.fake_eia` - a local stand-in for the EIA v2 API, with fault
  injection.
* :mod:`outbox.testing.scripted_gridpulse` - a local GridPulse stand-in whose answers a
  test scripts (the answers the reference receiver never gives).
* :mod:`outbox.testing.pgcluster` - a throwaway PostgreSQL cluster (initdb in a temporary
  directory, a free port on 127.0.0.1) for tests and benchmarks.

The bundled one-day sample (synthetic, real format) and the receiver runner ship with
the product in :mod:`outbox.sample`; the product imports nothing from here.
"""

from __future__ import annotations
