"""Backend conformance: the same tests on every backend."""
