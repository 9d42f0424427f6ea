"""Storage backends shipped with batchdb; each registers through the ``batchdb`` entry points."""
