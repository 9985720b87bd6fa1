"""How deep a snapshot is, when it must be flattened, and what it costs on disk.

Pure arithmetic on image facts, so the rules read in one place and are tested
without an engine. Depth and size both count from below, not from the image's
whole stack: the base image is shared by every snapshot and is not theirs.
"""

from __future__ import annotations

from actors.engine.base import ImageInfo

__all__ = ["ENGINE_MAX_LAYERS", "MIN_MAX_LAYERS", "depth_above", "must_flatten", "own_bytes"]

# Docker's layer store refuses a chain deeper than this (layer/layer_store.go, maxLayerDepth).
ENGINE_MAX_LAYERS = 125
# A snapshot is at least one layer above its base; a cap of 1 would flatten
# every commit to the depth it already has, so 2 is the smallest cap that bounds.
MIN_MAX_LAYERS = 2


def depth_above(image: ImageInfo, base: ImageInfo) -> int:
    """Layers of ``image`` above ``base``: 1 for a first snapshot, whatever the base's depth."""
    return image.layers - base.layers


def must_flatten(depth: int, max_layers: int, base_layers: int) -> bool:
    """Flatten a snapshot that reached the cap, or whose next commit the engine would refuse.

    With ``max_layers`` snapshots of snapshots, depths run 1, 2, ..., max_layers
    and back to 1: the chain never passes the cap and never starts over.
    """
    return depth >= max_layers or base_layers + depth >= ENGINE_MAX_LAYERS


def own_bytes(image: ImageInfo, parent: ImageInfo) -> int:
    """What ``image`` adds to the disk over ``parent``: its own layer(s), nothing shared.

    An image's size counts its whole chain, the base included; charging that to
    every snapshot counted the base once per snapshot (issue 11, item 3).
    """
    return max(0, image.size_bytes - parent.size_bytes)
