"""The device mesh, where parameters and batches live on it, and global batches from host data.

One mesh with two axes serves every scale:
  data  pure data parallelism: parameters replicated, the batch split
  fsdp  data parallelism that also splits large parameters (and their optimizer state), so a
        model too big for one device's memory still fits
The batch is split over both axes together: data × fsdp devices each hold B / (data·fsdp) rows.

Parameters are placed by one rule (big_vision's "fsdp" rule, applied by shape): an array with at
least two dimensions and `min_fsdp_size` elements is split over `fsdp` along its largest axis
that the fsdp size divides; everything else is replicated. Because the rule reads only shapes,
the Adam moments, which have their parameters' shapes, land exactly where their parameters do.

Imports only jax and numpy, so the core runs without the data stack.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); one axis may be -1 to fill."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one of data={data}, fsdp={fsdp} may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if known <= 0 or n % known:
            raise ValueError(f"config.mesh: {n} devices cannot be split with data={data}, "
                             f"fsdp={fsdp}")
        sizes[sizes.index(-1)] = n // known
    if sizes[0] * sizes[1] != n or min(sizes) < 1:
        raise ValueError(f"config.mesh: data={data} × fsdp={fsdp} does not match the {n} "
                         f"devices available")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (data × fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "config.batch_size") -> None:
    parallel = data_parallel_size(mesh)
    if batch_size % parallel or batch_size % jax.process_count():
        raise ValueError(
            f"{key}={batch_size} is not divisible by the data-parallel size {parallel} "
            f"(mesh data={mesh.shape['data']} × fsdp={mesh.shape['fsdp']}) and the "
            f"{jax.process_count()} process(es); choose a multiple of "
            f"{np.lcm(parallel, jax.process_count())}")


def param_spec(shape, fsdp_size: int, min_fsdp_size: int) -> P:
    """The rule: split the largest axis divisible by the fsdp size, for large arrays only."""
    if fsdp_size == 1 or len(shape) < 2 or int(np.prod(shape)) < min_fsdp_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, min_fsdp_size: int = 2 ** 14):
    """NamedShardings for every array in `tree` (concrete or jax.ShapeDtypeStruct)."""
    fsdp = mesh.shape["fsdp"]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, param_spec(shape, fsdp, min_fsdp_size))
    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """The global batch as sharded arrays, from this process's rows (NumPy arrays).

    Every process passes its own B / process_count rows; together they form one batch of B, so
    the losses see negatives from every host.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def put(tree, shardings):
    """Place host values (identical on every process) onto the mesh; works across hosts."""
    def one(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(one, tree, shardings)


def initialize_distributed() -> bool:
    """Join a multi-process job when the launcher says so; False when running alone.

    The launcher sets VALIGN_COORDINATOR_ADDRESS, VALIGN_NUM_PROCESSES and VALIGN_PROCESS_ID
    (GPU clusters, local multi-process tests), or VALIGN_MULTIHOST=1 on Cloud TPU pods and
    SLURM, where jax finds the coordinator itself.
    """
    env = os.environ
    if env.get("VALIGN_COORDINATOR_ADDRESS"):
        bad = [k for k in ("VALIGN_NUM_PROCESSES", "VALIGN_PROCESS_ID")
               if not env.get(k, "").isdigit()]
        if bad:
            raise ValueError(f"VALIGN_COORDINATOR_ADDRESS={env['VALIGN_COORDINATOR_ADDRESS']} is "
                             f"set, so {' and '.join(bad)} must be too (integers: how many "
                             f"processes, and this one's index from 0)")
        # Processes on CPU exchange arrays through gloo (jax's default today; explicit, as
        # without CPU collectives every cross-process computation fails).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=env["VALIGN_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["VALIGN_NUM_PROCESSES"]),
                                   process_id=int(env["VALIGN_PROCESS_ID"]))
        return True
    if env.get("VALIGN_MULTIHOST") == "1":
        jax.distributed.initialize()
        return True
    return False
