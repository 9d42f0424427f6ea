"""batchdb: priority-queued, memory-bounded batch writes through pluggable storage backends."""

from .backend import Backend, Batch, Capabilities, ErrorKind
from .candles import candles_table
from .hookspecs import hookimpl
from .manager import BatchDBManager
from .models import (
    BatchDBError,
    BatchOperation,
    NotRunningError,
    OperationFailed,
    OperationType,
    Priority,
    QueueFull,
    SchemaError,
    UnknownOperation,
)
from .schema import TableInfo
from .settings import BatchConfig, Settings, SettingsError, load_settings

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Batch",
    "BatchConfig",
    "BatchDBError",
    "BatchDBManager",
    "BatchOperation",
    "Capabilities",
    "ErrorKind",
    "NotRunningError",
    "OperationFailed",
    "OperationType",
    "Priority",
    "QueueFull",
    "SchemaError",
    "Settings",
    "SettingsError",
    "TableInfo",
    "UnknownOperation",
    "__version__",
    "candles_table",
    "hookimpl",
    "load_settings",
]
