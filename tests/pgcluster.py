"""The tests' throwaway PostgreSQL cluster lives in :mod:`outbox.testing.pgcluster` (the
benchmarks start one too); this name is kept for the tests that import it."""

from __future__ import annotations

from outbox.testing.pgcluster import USER, Cluster, Unavailable, find_bindir, free_port, wait_gone

__all__ = ["USER", "Cluster", "Unavailable", "find_bindir", "free_port", "wait_gone"]
