"""Self-describing Orbax checkpoints: the train state plus a JSON `meta` item (resolved config, vocab).

`sample.py` and any reload script need only the run directory. Restores go through an abstract
target that carries the *current* shardings, so a checkpoint moves between device counts.
"""
import os
import sys

import jax
import orbax.checkpoint as ocp

from core.errors import UserError

ITEMS = ("state", "meta")


def ckpt_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def manager(out_dir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """An async CheckpointManager over out_dir/checkpoints; half-written (tmp) steps are cleaned up."""
    # Orbax's own read_only mode logs a warning on every open; not creating or cleaning is enough.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=not read_only)
    return ocp.CheckpointManager(ckpt_dir(out_dir), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Start an async save; the device-to-host copy completes before this returns, so donation is safe."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def abstract_like(abstract_state, shardings):
    """ShapeDtypeStructs carrying the shardings the restored arrays must land in."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def restore_latest(mngr: ocp.CheckpointManager, target, check_meta=None, step: int | None = None):
    """(step, state, meta) of the newest readable checkpoint (or of `step`); None if there is none.

    check_meta(meta) runs before the state is read and may raise UserError (e.g. another model).
    A checkpoint that fails to read is reported with a warning and the previous one is tried;
    if checkpoints exist but none reads, that is an error, never a silent fresh start.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in {mngr.directory}; available: {sorted(steps)}")
        steps = [step]
    if not steps:
        return None
    for s in steps:
        try:
            meta = read_meta(mngr, s)
            if check_meta is not None:
                check_meta(meta)
            state = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
            return s, state, meta
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint surfaces as many error types
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            print(f"warning: checkpoint step {s} in {mngr.directory} is unreadable ({type(e).__name__}: {first}); "
                  f"falling back to an earlier one", file=sys.stderr)
    raise UserError(f"no readable checkpoint in {mngr.directory} (tried steps {steps}); "
                    f"pass resume=false to start this run afresh, or out_dir= for a new one")
