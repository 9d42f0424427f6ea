"""The postgres backend plugin (being written)."""
