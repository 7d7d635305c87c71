"""Data quality: findings about EIA's numbers, never edits (docs/quality.md).

* :mod:`outbox.quality.rules`: the rules, pure functions over a frame of observations.
* :mod:`outbox.quality.engine`: :class:`~outbox.quality.engine.Checker`, run by
  :meth:`outbox.store.stage.Staging.stage` inside its transaction on the rows it wrote; it stores
  findings, resolves the ones that hold again, and dead-letters rows a quarantine rule
  judged (code ``QUALITY_<RULE>``).
* :mod:`outbox.quality.ledger`: reads of the revision ledger and of the findings.
"""
