"""The benchmark: raw drivers and batchdb side by side."""

from .runs import *  # noqa: F403
from .runs import __all__  # noqa: F401
