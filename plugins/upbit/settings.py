"""The ``[upbit]`` settings section of the collector, and the check for its extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from pydantic import BaseModel, ConfigDict, Field, field_validator

from batchdb.models import BatchDBError

__all__ = ["EXTRA_MESSAGE", "MissingExtra", "UpbitSettings", "require"]

EXTRA_MESSAGE = ("the Upbit collector needs httpx and websockets: "
                 "pip install 'batchdb[upbit]'")


class MissingExtra(BatchDBError, ImportError):
    """A package of the ``upbit`` extra is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` (httpx, websockets), or a clear error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{EXTRA_MESSAGE} ({module} is missing: {exc})") from None


class UpbitSettings(BaseModel):
    """``[upbit]`` of settings.toml (or ``BATCHDB_UPBIT__KEY`` variables, or arguments:
    ``load_settings(upbit={...})``): where Upbit is and how hard to use it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field("https://api.upbit.com", description="REST API root")
    websocket_url: str = Field("wss://api.upbit.com/websocket/v1",
                               description="quotation WebSocket endpoint")
    requests_per_second: float = Field(
        10, ge=0, description="candle requests per second at most (Upbit's candle group "
        "allows 10); 0: no limit of our own (the server's Remaining-Req is still obeyed)")
    max_retries: int = Field(8, ge=0, description="retries of one request (429, 5xx, "
                             "timeouts, dropped connections) before its market fails")
    timeout_seconds: float = Field(10, gt=0, description="timeout of one HTTP request")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("websocket_url")
    @classmethod
    def _ws(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError(f"must be a ws:// or wss:// URL, got {value!r}")
        return value
