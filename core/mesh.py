"""The device mesh (axes `data`, `fsdp`), sharding rules, and assembling the global batch.

One device is a 1x1 mesh: the same code path runs on a laptop, a GPU box and a TPU pod.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from errors import UserError

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**14  # smaller arrays (biases, norms, tiny matrices) stay replicated


def make_mesh(cfg) -> Mesh:
    """A (data, fsdp) mesh over every device of every process; -1 takes the remaining devices."""
    n = jax.device_count()
    data, fsdp = cfg.data, cfg.fsdp
    if data == -1 and fsdp == -1:
        raise UserError("mesh.data and mesh.fsdp cannot both be -1; set one of them")
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp > n or (data * fsdp < n and jax.process_count() > 1):
        raise UserError(f"mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} does not fit the {n} devices; "
                        f"choose sizes whose product is {n} (or -1 for one of them)"
                        + ("" if jax.process_count() > 1 else "; a smaller product runs on the first devices"))
    # A smaller mesh than the machine (single process only) uses the first data*fsdp devices.
    devices = np.asarray(jax.devices()[: data * fsdp]).reshape(data, fsdp)
    return Mesh(devices, BATCH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """K batches stacked on a leading axis (several steps per call): axis 1 is the batch."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple, fsdp: int) -> P:
    """FSDP rule: shard the largest dimension divisible by the fsdp size; small arrays replicated."""
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def state_shardings(mesh: Mesh, abstract_state):
    """Shardings for every leaf of the train state (params and optimizer moments alike)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_state)


def process_rows(global_batch: int) -> slice:
    """The rows of the global batch this process builds: a contiguous block per process."""
    n, i = jax.process_count(), jax.process_index()
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def check_batch(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> None:
    dp = data_parallel_size(mesh)
    if global_batch % (dp * grad_accum):
        raise UserError(f"batch_size={global_batch} is not divisible by the {dp} data-parallel devices"
                        + (f" x optim.grad_accum={grad_accum}" if grad_accum > 1 else "")
                        + f"; use a multiple of {dp * grad_accum}")


def global_batch(local_rows: dict, sharding: NamedSharding) -> dict:
    """Assemble each process's rows into one global array sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_rows.items()}
