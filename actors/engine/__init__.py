"""The only package that talks to a container engine."""

from __future__ import annotations

from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    ContainerState,
    Engine,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ImageConfig,
    ImageInfo,
    ImageMissing,
    Logs,
    RegistryUnavailable,
)

__all__ = [
    "Conflict",
    "ContainerMissing",
    "ContainerSpec",
    "ContainerState",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineUnavailable",
    "ImageConfig",
    "ImageInfo",
    "ImageMissing",
    "Logs",
    "RegistryUnavailable",
]
