"""The stages: fetch (plan, stage), send, housekeeping, each over the store."""
