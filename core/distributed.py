"""Multi-host runs through JAX's own multi-controller runtime: one process per host, same command.

`jax.distributed.initialize()` auto-detects TPU VMs and SLURM; elsewhere (and in the tests, with
several local processes) the coordinator, process count and id are given explicitly.
"""
import copy
import os
from typing import Callable

import jax
import numpy as np

from errors import UserError, first_line


_joined = False  # this process's jax.distributed.initialize succeeded


def initialize(cfg) -> None:
    """Start the runtime once per process (a Hydra multirun calls this for every job)."""
    global _joined
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    explicit = {"coordinator_address": cfg.coordinator, "num_processes": cfg.num_processes,
                "process_id": cfg.process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if given and len(given) < 3:
        raise UserError("distributed.coordinator, distributed.num_processes and distributed.process_id go "
                        "together: give all three, or none to auto-detect (TPU VM, SLURM)")
    try:
        jax.distributed.initialize(**given, initialization_timeout=cfg.timeout_s)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"jax.distributed.initialize failed ({first_line(e)}); check distributed.coordinator and that "
                        f"every process was started with the same command") from None
    _joined = True


def writes_job_files(cfg) -> bool:
    """Whether this process writes what a sweep job's processes share (process 0 does), told without
    starting a JAX backend: one started before jax.distributed.initialize keeps later jobs from joining."""
    if _joined:
        return jax.process_index() == 0
    return not cfg.enabled or cfg.process_id in (None, 0)


_MESSAGE_BYTES = 1024


def agree(fn: Callable, failed: str = "could not read its inputs", failed_as: type = UserError):
    """fn() on every process, and a failure on any raised on all of them as `process I {failed}: ...`
    (a `failed_as` on the others: RunLocked, which a sweep skips rather than records).
    What a process reads from its own paths (data.path, init_from, distill.teacher), or judges of them
    on resume, can fail on one host only, which would otherwise leave the others waiting in the next
    collective until the coordinator gives up on the lost one."""
    if jax.process_count() == 1:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - every process learns of it below; this one re-raises it as it was
        error = e
    try:  # nothing here may raise before the allgather, or the others would wait for this process
        text = "" if error is None else first_line(error, _MESSAGE_BYTES) if isinstance(error, UserError) else \
            f"{type(error).__name__}: {first_line(error)}"
        raw = text.encode("utf-8", "backslashreplace")[:_MESSAGE_BYTES]  # a path may hold undecodable bytes
    except Exception:  # noqa: BLE001 - a message that cannot be shown: its type still can
        raw = type(error).__name__.encode()
    # flag 2: a failed_as, which the others raise as such (a held lock: skipped); 1: any other failure
    every = _allgather(0 if error is None else 2 if isinstance(error, failed_as) else 1, raw)
    if error is not None:
        raise error
    failing = [i for i, (flag, _) in enumerate(every) if flag]
    if failing:
        flag, text = every[failing[0]]
        raise (failed_as if flag == 2 else UserError)(f"process {failing[0]} {failed}: {text}")
    return result


def _allgather(flag: int, raw: bytes) -> list[tuple[int, str]]:
    """(flag, text) of every process, from this one's flag and up to _MESSAGE_BYTES of UTF-8."""
    from jax.experimental import multihost_utils

    mine = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    mine[0] = flag
    raw = raw[:_MESSAGE_BYTES]
    mine[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    return [(int(row[0]), bytes(row[1:]).rstrip(b"\0").decode(errors="ignore")) for row in every]


def from_process_0(value: int) -> int:
    """Process 0's `value` on every process (an int32)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def digest(value) -> str:
    """8 hex digits of a JSON value, its floats to 6 significant digits (hosts may round the last bits apart)."""
    import hashlib
    import json

    def rounded(x):
        if isinstance(x, float):  # near 0 (a fit's residual) only the rounding error is left: 0
            return 0.0 if abs(x) <= 1e-9 else float(f"{x:.6g}")  # NaN: kept, as "NaN"
        if isinstance(x, dict):
            return {str(k): rounded(v) for k, v in x.items()}
        return [rounded(v) for v in x] if isinstance(x, (list, tuple)) else x

    return hashlib.sha256(json.dumps(rounded(value), sort_keys=True, default=str).encode()).hexdigest()[:8]


def check_same_inputs(read: dict[str, str]) -> None:
    """UserError on every process if one read other inputs than process 0. `read`: per input (the data,
    init_from, distill.teacher) the step and digest this process read; a host's stale or partial copy
    (an older checkpoint, other labels) would otherwise train silently on a mix of the two."""
    if jax.process_count() == 1:
        return
    names = sorted(read)
    every = [text.split("\n") for _, text in _allgather(0, "\n".join(read[k] for k in names).encode())]
    for i, theirs in enumerate(every[1:], start=1):
        differ = [f"{k}: {a} against {b}" for k, a, b in zip(names, theirs, every[0]) if a != b]
        if differ:
            raise UserError(f"process {i} read other inputs than process 0 ({'; '.join(differ)}); give every "
                            f"host the same copy of each (a stale copy holds other steps)")


def check_shared_dir(out_dir: str) -> None:
    """Every process must see the directory process 0 writes checkpoints to (a shared filesystem)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = from_process_0(int(np.random.randint(1, 2**31 - 1)))
    probe = os.path.join(out_dir, f".shared_probe_{token}")
    if jax.process_index() == 0:
        with open(probe, "w") as f:
            f.write(str(token))
    multihost_utils.sync_global_devices("shared_probe_written")
    seen = np.int32(os.path.exists(probe))
    all_seen = multihost_utils.process_allgather(seen)
    multihost_utils.sync_global_devices("shared_probe_read")
    if jax.process_index() == 0:
        os.remove(probe)
    if not np.all(all_seen):
        missing = [i for i, s in enumerate(np.ravel(all_seen)) if not s]
        raise UserError(f"processes {missing} cannot see out_dir={out_dir}; put out_dir on a filesystem every "
                        f"host mounts (NFS, GCS via gcsfuse)")


# What may differ between the processes of one run: their ids, and paths to each host's copy of the data.
PATHS = ("data.path", "data.val_path", "data.dir", "data.tfds_data_dir", "init_from", "distill.teacher",
         "data.tokenizer_from")
PER_PROCESS = ("distributed", "progress", "compile_cache") + PATHS


def with_paths_of(saved: dict, current: dict) -> dict:
    """`current` (a config as a dict) with the PER_PROCESS keys as `saved` has them: what a process other
    than 0 compares with the checkpoint, which holds process 0's paths (check_same_config matched the rest)."""
    out = copy.deepcopy(current)
    for key in PER_PROCESS:
        *parents, leaf = key.split(".")
        src, dst = saved, out
        for p in parents:
            src, dst = (src or {}).get(p), (dst or {}).get(p)
        if isinstance(src, dict) and isinstance(dst, dict) and leaf in src:
            dst[leaf] = copy.deepcopy(src[leaf])
    return out


def check_same_config(cfg) -> None:
    """Every process must train the same config: a process started with another seed or size would train
    silently on its own (its rows, its state) and give a run that matches neither."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils
    from omegaconf import OmegaConf

    from core.config import flatten

    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    shared = {k: repr(v) for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in PER_PROCESS)}
    # Each host's own path, but on every host or none: an init_from only some processes load would
    # leave the others out of its collective restore (a list of teachers: as many on each)
    shared.update({k: repr(len(v) if isinstance(v, list) else bool(v)) for k, v in flat.items() if k in PATHS})
    digest = hashlib.sha256(repr(sorted(shared.items())).encode()).digest()[:8]
    every = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint32)))
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise UserError(f"processes {differ} were started with another config than process 0; start every "
                        f"process with the same command, only distributed.process_id differing")

