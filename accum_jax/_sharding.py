"""Accumulation on a device mesh: one gradient reduction per step.

A plain ``lax.scan`` over micro-batches of a batch sharded over a data axis
lets XLA's partitioner insert the gradient all-reduce into the loop body, so
``k`` micro-batches cost ``k`` all-reduces (measured on CPU, see
``docs/scaling.md``). Here the scan runs inside a ``jax.shard_map`` that is
manual over the batch axes only (other mesh axes, e.g. a model axis, stay with
the partitioner): every device accumulates the gradients of its own rows, and
the sums are reduced across devices once, after the loop.

Parameters replicated over the batch axes are marked device-varying
(``jax.lax.pcast``) before differentiating; without that, the transpose of
their implicit broadcast would put a ``psum`` inside the loop body. Parameters
sharded over a batch axis (FSDP) are gathered either inside the differentiated
function (``fsdp_reduce='per_microbatch'``: the gather's transpose is one
reduce-scatter per micro-batch and the accumulator stays sharded) or once
before the loop (``'per_step'``: a local, unsharded accumulator and one
reduce-scatter after the loop).

The batch axes are read from the batch's sharding where it is known: in its
type (explicit mesh axes), or, for a concrete array outside ``jit``, from the
array itself. Under ``jit`` on a mesh with ``AxisType.Auto`` axes the type
does not say how the batch is sharded (and the trace must not depend on it),
so the loop runs unsplit unless ``axis_name=`` names the axes; a warning at
trace time says so (see ``docs/scaling.md`` for why the axes are not guessed).
"""

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from accum_jax import _casts, _loop, _split, _sums
from accum_jax._varying import to_varying, varying_axes

FSDP_REDUCE = ('per_microbatch', 'per_step')


class Plan(NamedTuple):
  """How one call is split over the mesh.

  Attributes:
    mesh: the (abstract or concrete) mesh of the ``shard_map``.
    axes: the batch axes, over which the loop is manual and gradients reduced.
    num_shards: the number of batch shards, the product of the axes' sizes.
    param_specs: per parameter leaf, a ``PartitionSpec`` naming only batch
      axes: where the leaf is sharded over them (FSDP), ``P()`` if replicated.
    fsdp_reduce: ``'per_microbatch'`` or ``'per_step'``.
    inside: True when the batch axes are already manual (called inside a
      ``shard_map``): no new ``shard_map``, only the reduction after the loop.
  """

  mesh: Any
  axes: tuple[str, ...]
  num_shards: int
  param_specs: Any
  fsdp_reduce: str
  inside: bool


def _axes_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, (tuple, list)):
    return tuple(entry)
  return (entry,)


def _concrete(x) -> bool:
  """Whether ``x`` is an array with a placement (not a tracer under jit)."""
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _sharding_of(x) -> NamedSharding | None:
  """The sharding of ``x`` where it is known: a concrete array's own (which
  shows Auto axes too), else the one its type carries (explicit axes)."""
  if _concrete(x) and isinstance(x.sharding, NamedSharding):
    return x.sharding
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  return sharding if isinstance(sharding, NamedSharding) else None


def _known_spec(x) -> P | None:
  """The sharding spec of ``x`` where it is known (see ``_sharding_of``)."""
  sharding = _sharding_of(x)
  return None if sharding is None else sharding.spec


def _spec_mesh(tree) -> Any:
  """The mesh of the shardings of ``tree``'s leaves, where they are known."""
  for leaf in jax.tree.leaves(tree):
    sharding = _sharding_of(leaf)
    if sharding is not None and not sharding.mesh.empty:
      return sharding.mesh
  return None


def _resolve_mesh(mesh, batch):
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context
  return _spec_mesh(batch)


def _batch_axes(mesh, axis_name, batch) -> tuple[str, ...]:
  names = tuple(mesh.axis_names)
  if axis_name is not None:
    axes = _axes_tuple(axis_name)
    unknown = [a for a in axes if a not in names]
    if unknown or not axes:
      raise ValueError(
          f'axis_name={axis_name!r} names axes {unknown or axes} that are not '
          f'in the mesh, whose axes are {names}.'
      )
    return axes
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    spec = _known_spec(leaf)
    if spec is None or not len(spec):
      continue
    axes = _axes_tuple(spec[0])
    if axes:
      found.setdefault(axes, jax.tree_util.keystr(path) or '<batch>')
  if len(found) > 1:
    detail = ', '.join(f'{name}: {axes}' for axes, name in found.items())
    raise ValueError(
        'The batch leaves are sharded over different mesh axes along the '
        f'batch dimension ({detail}); shard them alike or pass axis_name=.'
    )
  return next(iter(found), ())


def _auto_axes_hint(mesh, batch, num_microbatches) -> str | None:
  """The warning for a mesh with Auto axes that could shard a traced batch
  whose placement is unknown, or None when there is nothing to fix."""
  if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(batch)):
    return None  # a concrete batch: its sharding was read, it is unsharded
  context = jax.sharding.get_abstract_mesh()
  if AxisType.Manual in getattr(context, 'axis_types', ()):
    return None  # inside a shard_map the caller places the reductions
  size = _split.batch_size(batch, num_microbatches)
  shape = dict(mesh.shape)
  names = [name for name, kind in zip(mesh.axis_names, mesh.axis_types,
                                      strict=True)
           if kind == AxisType.Auto and shape[name] > 1
           and size % (shape[name] * num_microbatches) == 0]
  if not names:
    return None
  axes = ', '.join(f'{a!r}: {shape[a]}' for a in names)
  fix = (f'axis_name={names[0]!r}' if len(names) == 1 else
         f'axis_name= naming the axes among {tuple(names)} that shard it '
         f'(e.g. axis_name={names[0]!r})')
  return (
      f'accum_jax: the mesh has Auto axes ({axes}), whose batch sharding is '
      'not visible under jit, so the loop of num_microbatches='
      f'{num_microbatches} runs unsplit and the partitioner may all-reduce '
      'the gradient once per micro-batch. If the batch is sharded along its '
      f'leading axis, pass {fix} for one reduction per step; if not (or to '
      'keep the partitioner\'s placement), pass axis_name=() to silence '
      'this. See docs/scaling.md, "Meshes with Auto axes".'
  )


def _param_spec(leaf, axes) -> P:
  spec = _known_spec(leaf)
  return P() if spec is None else _batch_spec(spec, axes)


def _batch_spec(spec: P, axes) -> P:
  """``spec`` with only the batch ``axes`` kept."""
  entries = []
  for entry in spec:
    kept = tuple(a for a in _axes_tuple(entry) if a in axes)
    entries.append(kept[0] if len(kept) == 1 else (kept or None))
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _given_specs(param_specs, params, axes) -> Any:
  """``param_specs`` (a ``PartitionSpec`` or ``NamedSharding``, or a pytree
  of them that is a prefix of ``params``) as one batch-axes spec per leaf."""
  def is_spec(x):
    return isinstance(x, (P, NamedSharding))

  def spread(spec, sub):
    if not is_spec(spec):
      raise TypeError(
          'param_specs must hold PartitionSpecs or NamedShardings (one for '
          'all parameters, or a pytree like the params), got '
          f'{type(spec).__name__}.')
    spec = spec.spec if isinstance(spec, NamedSharding) else spec
    return jax.tree.map(lambda leaf: _checked_spec(spec, leaf, axes), sub)

  try:
    return jax.tree.map(spread, param_specs, params, is_leaf=is_spec)
  except ValueError as e:
    raise ValueError(
        'param_specs must be one spec for all parameters or a pytree like '
        f'the params (or a prefix of it): {e}') from e


def _checked_spec(spec: P, leaf, axes) -> P:
  if len(spec) > np.ndim(leaf):
    raise ValueError(
        f'param_specs: {spec} has {len(spec)} entries for a parameter of '
        f'shape {np.shape(leaf)}.')
  return _batch_spec(spec, axes)


def _hidden_params_hint(mesh, axes, params) -> str | None:
  """The warning for parameters whose sharding over Auto batch axes is not
  visible under jit (they would enter the loop replicated), or None."""
  types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  if not all(types.get(a) == AxisType.Auto for a in axes):
    return None
  if not any(isinstance(p, jax.core.Tracer) and np.ndim(p)
             for p in jax.tree.leaves(params)):
    return None  # concrete params: their shardings were read
  return (
      f'accum_jax: the batch axes {axes} are Auto, so under jit the '
      'parameters\' shardings are not visible and they enter the per-device '
      'loop replicated over them: a parameter sharded over these axes (FSDP) '
      'is gathered whole on every device for the whole step. Pass '
      'param_specs= (their PartitionSpecs, or NamedShardings as given to '
      'jit; param_specs=P() for replicated parameters silences this), use '
      'Explicit mesh axes, or axis_name=() to leave the placement to the '
      'partitioner (which on GPU and TPU gathers per micro-batch and moves a '
      'data-parallel reduction after the loop). See docs/scaling.md.'
  )


def plan(
    mesh: Any,
    axis_name: Any,
    fsdp_reduce: str,
    params: Any,
    batch: Any,
    num_microbatches: int,
    param_specs: Any = None,
) -> Plan | None:
  """Decides whether and how to split the loop over the mesh.

  Returns ``None`` (run the plain scan) when there is no mesh, or the batch
  is not sharded over any axis of size > 1. ``param_specs`` gives the
  parameters' shardings where their types do not (Auto axes).
  """
  if fsdp_reduce not in FSDP_REDUCE:
    raise ValueError(
        f'fsdp_reduce must be one of {FSDP_REDUCE}, got {fsdp_reduce!r}.'
    )
  if axis_name is not None and not _axes_tuple(axis_name):
    return None  # axis_name=(): not split over the mesh, on purpose
  mesh = _resolve_mesh(mesh, batch)
  if mesh is None or mesh.empty:
    if axis_name is not None:
      raise ValueError(
          f'axis_name={axis_name!r} was given but there is no mesh: set one '
          'with `with jax.set_mesh(mesh):` or pass mesh=.'
      )
    return None
  axes = _batch_axes(mesh, axis_name, batch)
  if not axes:
    hint = _auto_axes_hint(mesh, batch, num_microbatches)
    if hint is not None:
      warnings.warn(hint, UserWarning, stacklevel=2)
  shape = dict(mesh.shape)
  num_shards = math.prod(shape[a] for a in axes)
  if num_shards == 1:
    return None
  context = jax.sharding.get_abstract_mesh()
  types = dict(zip(context.axis_names, context.axis_types, strict=True))
  manual = [a for a in axes if types.get(a) == AxisType.Manual]
  inside = bool(manual)
  if inside and len(manual) != len(axes):
    raise ValueError(
        f'The batch axes {axes} are partly manual ({tuple(manual)}) in this '
        'shard_map; make all of them manual, or none.'
    )
  size = _split.batch_size(batch, num_microbatches)
  if not inside and size % (num_shards * num_microbatches):
    raise ValueError(
        f'The batch size {size} is split over {num_shards} devices (mesh axes '
        f'{axes}) and num_microbatches={num_microbatches}: it must be a '
        f'multiple of {num_shards} * {num_microbatches} = '
        f'{num_shards * num_microbatches}.'
    )
  if inside:
    specs = jax.tree.map(lambda _: P(), params)
  elif param_specs is not None:
    specs = _given_specs(param_specs, params, axes)
  else:
    hint = _hidden_params_hint(mesh, axes, params)
    if hint is not None:
      warnings.warn(hint, UserWarning, stacklevel=2)
    specs = jax.tree.map(lambda p: _param_spec(p, axes), params)
  return Plan(mesh, axes, num_shards, specs, fsdp_reduce, inside)


@jax.custom_vjp
def _pin(x):
  """The identity, whose gradient passes an ``optimization_barrier``.

  On a parameter shard before its all-gather: the gather's transpose
  reduce-scatters each micro-batch's gradient, and XLA:TPU otherwise moves
  those reduce-scatters out of the loop (a sum of reduce-scatters is a
  reduce-scatter of the sum), accumulating an unsharded gradient: 1.78x the
  twin's peak on the FSDP LM of benchmarks/aot.py, 0.92x with the barrier.
  """
  return x


def _pin_fwd(x):
  return x, None


def _pin_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


_pin.defvjp(_pin_fwd, _pin_bwd)


def _gather(x, spec: P):
  for dim, entry in enumerate(spec):
    if entry is not None:
      x = jax.lax.all_gather(x, entry, axis=dim, tiled=True)
  return x


def _gather_as(x, spec: P, dtype):
  """``_gather(x)`` for a loss whose one use of the gathered parameter is a
  cast to ``dtype``: gathered cast (the cast commutes with the gather; half
  the bytes moved and held for float32 to bfloat16) and widened back, so the
  loss sees its parameter's dtype and its own cast gives the same values
  (the compiler folds the widening into it). The gradient is reduce-scattered
  in ``x``'s dtype, as the gather of ``x`` gives it: the same numbers."""
  if dtype is None:
    return _gather(x, spec)

  @jax.custom_vjp
  def gather(x):
    return _gather(x.astype(dtype), spec).astype(x.dtype)

  def fwd(x):
    return gather(x), None

  def bwd(_, ct):
    return (_reduce_grad(ct, spec, (), scatter=True),)

  gather.defvjp(fwd, bwd)
  return gather(x)


def _spec_axes(spec: P) -> tuple[str, ...]:
  return tuple(a for entry in spec for a in _axes_tuple(entry))


def _psum(x, axes):
  if not axes:
    return x
  return jax.lax.psum(to_varying(x, axes), axes)


def _reduce_grad(g, spec: P, axes, scatter: bool):
  """Sums a local gradient over the devices into the leaf's own sharding."""
  if scatter:
    for dim, entry in enumerate(spec):
      if entry is not None:
        g = jax.lax.psum_scatter(to_varying(g, _axes_tuple(entry)), entry,
                                 scatter_dimension=dim, tiled=True)
  rest = tuple(a for a in axes if a not in _spec_axes(spec))
  return _psum(g, rest)


def _agree(x, axes):
  """One value of a carried state for all devices: a state that depends on
  the device's rows (e.g. BatchNorm statistics) is averaged over the devices
  if floating, its maximum taken otherwise (counters)."""
  varying = tuple(a for a in axes if a in varying_axes(x))
  if not varying:
    return x
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.pmean(x, varying)
  return jax.lax.pmax(x, varying)


def _agree_key(given, folded, key, axes):
  """One value of a carried key for all devices. A key the loop left as it
  was (an nnx.Rngs stream's: its counter advances instead) comes back as
  given, unfolded; a key the loss replaced comes back as the elementwise
  maximum of the devices' key data (some valid key, the same everywhere)."""
  varying = tuple(a for a in axes if a in varying_axes(key))
  if not varying:
    return key
  data = jax.random.key_data(key)
  kept = jnp.all(data == jax.random.key_data(folded))
  data = jnp.where(kept, jax.random.key_data(given), data)
  return jax.random.wrap_key_data(jax.lax.pmax(data, varying),
                                  impl=jax.random.key_impl(given))


def _global_like(param, grad_like):
  """The gradient's global shape, dtype and (explicit) sharding: zeros made
  from it (an empty window's updates) match the real updates' type."""
  sharding = None
  if _known_spec(param) is not None:
    mesh = jax.typeof(param).sharding.mesh
    if AxisType.Explicit in mesh.axis_types:
      sharding = jax.typeof(param).sharding
  return jax.ShapeDtypeStruct(np.shape(param), grad_like.dtype,
                              sharding=sharding)


def _plain(like):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), like)


def scan(plan_: Plan, loop: _loop.LoopSpec, inp: _loop.Inputs,
         start: Any = None) -> _loop.Result:
  """:func:`accum_jax._loop.scan` on every device's rows, reduced once after
  the loop; same contract."""
  axes = plan_.axes
  specs = plan_.param_specs
  per_step = plan_.fsdp_reduce == 'per_step'
  scattered = not per_step and any(len(s) for s in jax.tree.leaves(specs))
  if scattered and loop.nonfinite != 'propagate':
    raise ValueError(
        f"nonfinite={loop.nonfinite!r} with parameters sharded over the batch "
        f"axes {axes} needs fsdp_reduce='per_step': with 'per_microbatch' a "
        'gradient is reduce-scattered before it can be screened, so no device '
        'sees a whole micro-batch gradient.'
    )
  if scattered and loop.track_noise_scale:
    raise ValueError(
        f"track_noise_scale with parameters sharded over the batch axes {axes}"
        " needs fsdp_reduce='per_step': with 'per_microbatch' a gradient is "
        'reduce-scattered before its squared norm can be taken, so no device '
        'sees a whole micro-batch gradient.'
    )
  local = loop
  if scattered:
    # The gathers' transpose reduce-scatters each micro-batch's gradient
    # inside the differentiated function, so a weight must seed it there.

    def gathered(shards, microbatch, *args, **kwargs):
      # A parameter the loss only casts (to bfloat16) is gathered cast.
      dtypes = _casts.cast_dtypes(
          lambda p, *a, **k: loop.loss_fn(jax.tree.map(_gather, p, specs), *a,
                                          **k),
          shards, microbatch, *args, **kwargs)
      flat, treedef = jax.tree.flatten(shards)
      params = [_gather_as(_pin(x), spec, dtype) for x, spec, dtype in zip(
          flat, treedef.flatten_up_to(specs), dtypes, strict=True)]
      return loop.loss_fn(jax.tree.unflatten(treedef, params), microbatch,
                          *args, **kwargs)

    local = dataclasses.replace(loop, loss_fn=gathered,
                                prescale=loop.options.weight_fn is not None)
  shapes = []

  def reduce_grads(grads):
    return jax.tree.map(
        lambda g, s: _reduce_grad(g, s, axes, scatter=per_step), grads, specs)

  # A window left part-full seeds the loop's carry rather than joining the
  # sums after the reduction: its buffer is then the carry (on one device of
  # each group the sum is reduced over), as on one device. Under unit
  # weights the sums are scaled by 1 / shards after the reduction, so the
  # seed is scaled up first, which is exact for a power-of-two shard count;
  # otherwise, and for gradients reduce-scattered only after the loop
  # (``'per_step'`` with sharded parameters), it joins after.
  factor = 1 if loop.options.weight_fn is not None else plan_.num_shards
  seeded = (start is not None and factor & (factor - 1) == 0
            and not (per_step and any(len(s) for s in jax.tree.leaves(specs))))

  def seed(acc, spec):
    acc = acc * jnp.asarray(factor, acc.dtype) if factor != 1 else acc
    rest = tuple(a for a in axes if a not in _spec_axes(spec))
    if not rest:  # every device's carry is its own shard of the sum
      return acc
    acc = to_varying(acc, rest)
    return jnp.where(jax.lax.axis_index(rest) == 0, acc, jnp.zeros_like(acc))

  def device_fn(params, batch, args, kwargs, num_real, state, start):
    # Devices draw independent keys for their rows of a micro-batch: the
    # arguments' keys, and the threaded state's (an nnx.Rngs' stream keys).
    index = jax.lax.axis_index(axes)
    args, kwargs = _loop.fold_rng(args, kwargs, index)
    state_in = state
    state = jax.tree.map(
        lambda x: _loop.fold_key(x, index) if _loop.is_key(x) else x, state)
    if per_step:
      params = jax.tree.map(_gather, params, specs)
    # Invariant (replicated) params would get a psum in the loop body.
    params = jax.tree.map(lambda p: to_varying(p, axes), params)
    if start is not None:
      start = jax.tree.map(seed, start, specs)
    result = _loop.scan(local, _loop.Inputs(params, batch, args, kwargs,
                                            num_real, state), start)
    shapes.append(result.shapes)
    return (result.sums.reduce(axes, reduce_grads),
            jax.tree.map(lambda given, folded, c: _agree_key(
                given, folded, c, axes) if _loop.is_key(given)
                         else _agree(c, axes), state_in, state, result.state))

  if plan_.inside:
    run = device_fn
  else:
    run = jax.shard_map(
        device_fn, mesh=plan_.mesh,
        in_specs=(specs, P(axes), P(), P(), P(), P(),
                  specs if seeded else P()),
        out_specs=(_sums.Sums(specs, P(), P(), P(), P(), P(), P(axes), P()),
                   P()),
        axis_names=frozenset(axes))
  sums, state = run(inp.params, inp.batch, inp.args, inp.kwargs,
                    inp.num_real, inp.state, start if seeded else None)
  if loop.options.weight_fn is None:
    # Unit weights: a device's share of a micro-batch weighs 1 / num_shards,
    # so a micro-batch weighs 1 as on one device (the mean is unchanged, and
    # a window left part-full by cross-step updates is weighted the same).
    sums = sums.scaled(1.0 / plan_.num_shards, shapes[0].summed)
  if start is not None and not seeded:
    sums = sums.joined(start)
  (local_shapes,) = shapes
  return _loop.Result(sums, state, _sums.Shapes(
      _plain(local_shapes.value), _plain(local_shapes.aux),
      jax.tree.map(_global_like, inp.params, local_shapes.grads),
      local_shapes.summed))
