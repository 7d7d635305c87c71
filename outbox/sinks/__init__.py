"""Sinks: the destinations the send stage delivers to, each implementing ``ports.Sink``."""
