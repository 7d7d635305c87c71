"""gridpulse-outbox: EIA-930 hourly grid data -> SQLite outbox -> GridPulse ingest API."""

__version__ = "0.1.0"
USER_AGENT = f"gridpulse-outbox/{__version__} (+https://github.com/gridpulse/gridpulse-outbox)"
