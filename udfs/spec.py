"""What a stage says about itself, so the engine derives everything else.

Each stage family lists its stages as `StageSpec` entries in its package
(`udfs/<family>/__init__.py`, beside the classes); `udfs.registry` collects
them. From those entries the engine plans a curate run, builds the clip
schema and the table metadata, checks a resumed run's settings, and resolves
models on the driver. Nothing keeps a list of stages, columns or keys by hand.

A spec is plain data: it imports nothing heavy, so reading the registry
never loads a model, PyAV or a GPU library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

if TYPE_CHECKING:
    from udfs.analysis.rules import FilterRule

# Keys of a stage's config node that are the engine's, never a constructor argument.
ENGINE_KEYS = frozenset({"name", "enabled", "resources"})

# Keys that change only how fast or where the work runs (or how much memory
# it takes), never what a stage writes. Every stage's runtime keys include these.
COMMON_RUNTIME_KEYS = frozenset({"resources", "storage_options"})

ColumnsFn = Callable[[Mapping[str, Any]], list[pa.Field]]


@dataclass(frozen=True)
class StageSpec:
    """One stage, as its config node sees it.

    `node` is the config node (`cfg.<node>`); a node that is a config group
    with several implementations (`split`, `embed`, `caption`) has one spec
    per `choice` (the node's `name`). A node with `impl=None` has no stage of
    its own: its settings go to the stage of node `feeds`, as the keyword
    argument `<node>` (the motion scores and previews are made by transcode).
    """

    node: str
    impl: str | None
    level: Literal["video", "clip"]
    # The Ray Data operator's name, shown in logs, progress and the dashboard.
    step: str | None = None
    choice: str | None = None
    # (key, value meaning off): an off stage is left out of the plan, and its
    # other settings do not matter to the output.
    switch: tuple[str, Any] | None = None
    # For a node of several blocks that each turn on and off (`quality`):
    # whether any part of it is on. Used where `switch` is None.
    on: Callable[[Mapping[str, Any]], bool] | None = None
    # Keys of the node that never change the output (beyond COMMON_RUNTIME_KEYS).
    runtime_keys: frozenset[str] = frozenset()
    # The columns it adds when on, from its constructor arguments.
    columns: ColumnsFn | None = None
    # The dotted config key of the frame spec it needs from the clip decode
    # (`clip_analysis`), and the name of the frame columns it reads.
    frames: str | None = None
    frame_consumer: str | None = None
    # Constructor arguments naming model ids or folders, resolved once on the
    # driver (a hub id is downloaded, a missing folder fails the run at once),
    # and files that must exist (made absolute for actors elsewhere).
    models: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    # Weights that may be a plain file or folder: used as they are when they
    # exist, else resolved as a hub id.
    weights: tuple[str, ...] = ()
    # Constructor arguments the engine supplies rather than the node
    # (credentials, the nodes that feed it, the frame consumers).
    supplied: tuple[str, ...] = ()
    # Node keys the engine reads and does not pass to the constructor.
    engine_only: tuple[str, ...] = ()
    # The clip decode that extracts frames for the stages that declare `frames`:
    # it runs (and its settings matter) only when one of them is on.
    serves_frames: bool = False
    # The filters judging the columns it adds (`udfs.analysis.rules`), in the
    # order their reasons are listed; `task=filter` re-applies them.
    filters: tuple[FilterRule, ...] = ()
    # "module:function" run on the driver with the node's settings before
    # any video is decoded: it validates them and resolves what the node
    # names (a model file), returning the settings the workers get.
    prepare: str | None = None

    @property
    def key(self) -> str:
        return f"{self.node}={self.choice}" if self.choice else self.node

    def runtime(self) -> frozenset[str]:
        return COMMON_RUNTIME_KEYS | self.runtime_keys

    def is_on(self, params: Mapping[str, Any]) -> bool:
        if self.switch is None:
            return self.on(params) if self.on is not None else True
        key, off = self.switch
        return params.get(key, off) != off

    def added_columns(self, params: Mapping[str, Any]) -> list[pa.Field]:
        return list(self.columns(params)) if self.columns else []

    def constructor_keys(self, node: Mapping[str, Any]) -> set[str]:
        """The constructor arguments a config node gives this stage."""
        return {k for k in node if k not in ENGINE_KEYS and k not in self.engine_only} | set(self.supplied)


def fields(*groups: list[pa.Field]) -> ColumnsFn:
    """A `columns` function for a stage whose columns do not depend on its settings."""
    out = [f for group in groups for f in group]
    return lambda _params: out
