"""Orbax checkpoints of the train state and the data iterator, verified on restore.

Each step directory holds three items, written atomically together by Orbax:
`state` (the TrainState), `data` (grain iterator state) and `meta` (JSON: what model
and data shape made it, and a checksum of every array). Orbax stores no checksums of
its own, so bytes flipped inside a data file would restore silently with wrong values;
the checksums catch that. A latest step that fails to restore or verify is reported
and the previous good one is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import grain.python as grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or no checkpoint can be restored."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Position-weighted uint32 sum of the raw bits: any changed word changes it.

    The weight of an element is 2 * (its row-major index) + 1, built from per-axis iotas
    in the array's own shape: raveling a sharded array first would make XLA reshard it
    (slow to compile and run for arrays sharded along an inner axis).
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 8-byte types: fold both halves in.
        pair = jax.lax.bitcast_convert_type(x, jnp.uint32)
        bits = pair[..., 0] ^ (pair[..., 1] * jnp.uint32(0x9E3779B1))
    index = jnp.zeros((), jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    # Odd weights: a change of 2^k (k < 32) times an odd number is never 0 mod 2^32.
    weights = index * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _leaf_checksum_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else True
    return _leaf_checksum(x), jnp.asarray(finite)


def tree_checksums(tree: Any) -> tuple[dict[str, int], bool]:
    """Per-leaf checksums keyed by path, and whether every float leaf is finite."""
    from diffjax.parallel import host_value

    # One small program per leaf signature, not one for the whole tree: XLA's compile time
    # grows with the leaves in a program (~14 s for the 648 of a small U-Net's train
    # state on a 2-core CPU) while a state has few distinct signatures (30 there: 5 s).
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = host_value([_leaf_checksum_and_finite(x) for _, x in flat])
    sums = {jax.tree_util.keystr(p): int(s) for (p, _), (s, _) in zip(flat, out, strict=True)}
    return sums, all(bool(f) for _, f in out)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (so restore reshards)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _register_array_handler() -> None:
    """Writes replicated arrays with replica-parallel slicing only across processes.

    Orbax's default splits every replicated array among its replicas so that several
    hosts share the writing. In one process every replica is local, so that only adds a
    device-side slice per (array shape, replica): a compiled program each, 192 of them
    (~20 s on a 2-core CPU) for a small U-Net's first save over 8 devices.
    """
    global _ARRAY_HANDLER_PROCESSES
    if _ARRAY_HANDLER_PROCESSES == jax.process_count():
        return
    # The default handler's arguments, but for use_replica_parallel. The metadata store
    # has no public path in orbax 0.12.
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        use_replica_parallel=jax.process_count() > 1,
    )
    absl = logging.getLogger("absl")  # it warns that the override overrides
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl.setLevel(level)
    _ARRAY_HANDLER_PROCESSES = jax.process_count()


_ARRAY_HANDLER_PROCESSES: int | None = None


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        _register_array_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self, step: int, state: Any, data_iterator=None, *, meta: Mapping[str, Any] | None = None
    ) -> bool:
        """Starts an (async) save of `state` at `step`; refuses non-finite states.

        Returns False if `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        sums, finite = tree_checksums(state)
        if not finite:
            raise CheckpointError(
                f"Refusing to save step {step}: the state holds NaN or inf values."
            )
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({**dict(meta or {}), "step": int(step), "checksums": sums}),
        }
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        try:
            return self._manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:  # disk full, permissions, ...
            raise CheckpointError(
                f"Saving checkpoint step {step} to {self.directory} failed: {e}. "
                "Earlier checkpoints are intact; free disk space or fix the path and resume."
            ) from e

    def wait(self) -> None:
        """Blocks until pending saves are committed; surfaces their errors."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"Finishing a checkpoint save in {self.directory} failed: {e}. "
                "Earlier checkpoints are intact."
            ) from e

    def read_meta(self, step: int) -> dict[str, Any]:
        return dict(
            self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        )

    def restore_step(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """Restores and verifies one step; raises on any mismatch or corruption."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state, meta = restored["state"], restored["meta"]
        expected = meta.get("checksums")
        if expected is None:
            raise CheckpointError(f"step {step} has no checksums in its metadata.")
        actual, _ = tree_checksums(state)
        bad = sorted(k for k in expected if actual.get(k) != expected[k])
        missing = sorted(set(actual) - set(expected))
        if bad or missing:
            raise CheckpointError(
                f"step {step} failed verification: checksum mismatch in {bad[:5] + missing[:5]}"
                f"{' ...' if len(bad) + len(missing) > 5 else ''} (corrupt files)."
            )
        return state

    def restore_latest(
        self, abstract_state: Any, data_iterator=None, *, check_meta=None
    ) -> tuple[Any, int] | None:
        """Restores the newest step that restores and verifies, falling back step by step.

        Args:
          abstract_state: ShapeDtypeStructs with target shardings.
          data_iterator: grain iterator whose state is restored in place.
          check_meta: optional `fn(meta) -> None` that raises (e.g. on a different
            model); its error is not treated as corruption and propagates.

        Returns:
          (state, step), or None when there is no checkpoint at all.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 — corrupt metadata is one more corruption.
                failures.append((step, f"unreadable metadata: {type(e).__name__}: {e}"))
                log.warning("Checkpoint step %d is unreadable (%s); trying an older one.", step, e)
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state = self.restore_step(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 — Orbax raises assorted types on corruption.
                failures.append((step, f"{type(e).__name__}: {e}"))
                log.warning(
                    "Checkpoint step %d in %s could not be restored (%s: %s); "
                    "falling back to an older one.",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e)[:300],
                )
                continue
            if failures:
                log.warning(
                    "Resumed from step %d; skipped corrupt step(s) %s.",
                    step,
                    [s for s, _ in failures],
                )
            return state, step
        detail = "; ".join(f"step {s}: {msg[:200]}" for s, msg in failures)
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be restored ({detail}). Move that "
            "directory away to start fresh, or point --workdir elsewhere."
        )

    def close(self) -> None:
        self.wait()
        self._manager.close()
