"""The stages: each takes what the one before handed over and hands on what it made."""
