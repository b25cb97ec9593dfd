"""A step's example arguments placed on a target's devices, as it will train.

The planner compiles for a mesh the user does not have yet: the batch axes
name the mesh's axes the batch is split over, and each argument's partition
specs (replicated by default, the batch split along its leading axis) give
the data-parallel, FSDP or 2-D layout. Nothing is allocated: every argument
becomes a ``jax.ShapeDtypeStruct`` with its sharding.
"""

import contextlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from accum_jax import _compat, _targets


class Placement(NamedTuple):
  """Where a planned step runs.

  Attributes:
    mesh: the mesh the step is compiled under, or ``None`` on one device.
    args: the step's positional arguments as sharded ``ShapeDtypeStruct``\\ s.
    kwargs: its keyword arguments, likewise (replicated).
    batch_shards: how many ways the batch is split (the product of the batch
      axes' sizes; 1 on one device).
  """

  mesh: jax.sharding.Mesh | None
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  batch_shards: int

  def context(self):
    """The context to lower the step in: the mesh set, if there is one."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return _compat.set_mesh(self.mesh)


def _dtype(x):
  return x.dtype if hasattr(x, 'dtype') else np.result_type(x)


def _struct(x, sharding):
  return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=sharding)


def _names(axes: str | Sequence[str]) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _spec_tree(entry: Any, arg: Any, default: PartitionSpec,
               where: str) -> Any:
  """One ``PartitionSpec`` per leaf of ``arg``, from an ``in_specs`` entry:
  ``None`` (the default), a spec, a callable of the leaf, or a pytree prefix
  of specs."""
  if entry is None:
    entry = default
  if callable(entry) and not isinstance(entry, PartitionSpec):
    def spec_of(x):
      spec = entry(jax.ShapeDtypeStruct(np.shape(x), _dtype(x)))
      if not isinstance(spec, PartitionSpec):
        raise TypeError(f'in_specs for {where}: the callable returned '
                        f'{spec!r} for a leaf of shape {np.shape(x)}; it must '
                        'return a jax.sharding.PartitionSpec.')
      return spec
    return jax.tree.map(spec_of, arg)
  try:
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda _: spec, sub), entry, arg,
        is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None)
  except ValueError as e:
    raise ValueError(
        f'in_specs for {where} must be a PartitionSpec, a callable of a leaf, '
        f'or a pytree prefix of the argument\'s structure: {e}') from e


def place(target: _targets.Target, args: Sequence[Any],
          kwargs: dict[str, Any], *, batch_argnum: int,
          mesh_axes: str | Sequence[str] | None = None,
          mesh: jax.sharding.Mesh | None = None,
          in_specs: Sequence[Any] | None = None) -> Placement:
  """Places ``args`` on ``target``'s devices (see :func:`plan_microbatches`).

  Raises:
    ValueError: several devices and no batch axes, a mesh over other
      devices, axes the mesh does not have, or ``in_specs`` that do not
      match the arguments.
  """
  n = len(target.devices)
  if mesh is None and mesh_axes is None:
    if n > 1:
      raise ValueError(
          f'target {target.name!r} has {n} devices: name the mesh axis the '
          "batch is split over (mesh_axes=('data',)), or pass mesh= (a mesh "
          'over target.devices) for FSDP over several axes or 2-D layouts.')
    if in_specs is not None:
      raise ValueError('in_specs= needs a mesh: pass mesh_axes= or mesh=.')
    device = SingleDeviceSharding(target.devices[0])
    leaves = jax.tree.map(lambda x: _struct(x, device), (tuple(args), kwargs))
    return Placement(None, *leaves, 1)
  if mesh is None:
    axes = _names(mesh_axes)
    if len(axes) != 1:
      raise ValueError(
          f'mesh_axes={axes!r} names several axes: build the mesh yourself '
          '(jax.make_mesh(shape, names, devices=target.devices)) and pass it '
          'as mesh=.')
    mesh = _compat.make_mesh((n,), axes, devices=target.devices)
  else:
    theirs = {d.id for d in mesh.devices.flat}
    if not theirs <= {d.id for d in target.devices} or (
        mesh.devices.flat[0].platform != target.platform):
      raise ValueError(
          f'mesh= is not over the devices of target {target.name!r}: build '
          'it with jax.make_mesh(shape, names, devices=target.devices).')
  axes = mesh.axis_names if mesh_axes is None else _names(mesh_axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f'mesh_axes {unknown} are not axes of the mesh '
                     f'{dict(mesh.shape)}.')
  if in_specs is None:
    in_specs = (None,) * len(args)
  if len(in_specs) != len(args):
    raise ValueError(f'in_specs has {len(in_specs)} entries for {len(args)} '
                     'positional arguments; give one per argument (None for '
                     'the default).')
  batch = PartitionSpec(axes if len(axes) > 1 else axes[0])
  placed = []
  for i, (arg, entry) in enumerate(zip(args, in_specs)):
    default = batch if i == batch_argnum else PartitionSpec()
    specs = _spec_tree(entry, arg, default, f'argument {i}')
    placed.append(jax.tree.map(
        lambda x, s: _struct(x, NamedSharding(mesh, s)), arg, specs))
  replicated = NamedSharding(mesh, PartitionSpec())
  kwargs = jax.tree.map(lambda x: _struct(x, replicated), kwargs)
  shards = math.prod(mesh.shape[a] for a in axes)
  return Placement(mesh, tuple(placed), kwargs, shards)

