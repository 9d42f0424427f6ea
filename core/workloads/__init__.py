"""Programs that drive a :class:`~batchdb.manager.BatchDBManager`: file ingest, the trading
demo and the benchmark.

They sit above the library: they import ``batchdb`` (manager, models, schema, settings,
plugins) and nothing in the library imports them. The ``batchdb`` command line
(:mod:`batchdb.cli`) parses arguments, calls into these modules and renders what they
return.
"""
