"""Where pages come from: each module implements :class:`outbox.ports.Source`."""
