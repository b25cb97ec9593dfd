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
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from accum_jax import _compat, _nonfinite, _split

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


def _known_spec(x) -> P | None:
  """The sharding spec of ``x`` if its type carries one (explicit axes)."""
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  if not isinstance(sharding, NamedSharding):
    return None
  return sharding.spec


def _spec_mesh(tree) -> Any:
  """The mesh carried by the types of ``tree``'s leaves (explicit axes)."""
  for leaf in jax.tree.leaves(tree):
    try:
      sharding = jax.typeof(leaf).sharding
    except (TypeError, AttributeError):
      continue
    if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
      return sharding.mesh
  return None


def varying_axes(x) -> frozenset:
  """The manual mesh axes over which ``x`` (array or ShapeDtypeStruct) varies."""
  aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  manual = getattr(aval, 'manual_axis_type', None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, 'vma', ()))


def to_varying(x, axes: tuple[str, ...]):
  """``x`` marked device-varying over ``axes`` (a no-op at run time)."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return _compat.pcast(x, missing, to='varying') if missing else x


def zeros_like_struct(like: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of ``like``'s shape and dtype, device-varying where it is."""
  zeros = jnp.zeros(like.shape, like.dtype)
  axes = tuple(varying_axes(like))
  return to_varying(zeros, axes) if axes else zeros


def match_carry(body: Callable[..., Any], init: Any) -> Any:
  """Makes a scan carry as device-varying as the body makes it.

  Inside a ``shard_map`` a loop whose body adds a device-varying gradient to
  a carry initialised with (invariant) zeros fails to type-check. Outside any
  manual axes this returns ``init`` untouched, without tracing ``body``.
  """
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return init
  index = jax.ShapeDtypeStruct((), jnp.int32)
  for _ in range(4):  # a fixed point; each pass can only add varying axes
    out, _ = jax.eval_shape(body, init, index)
    new = jax.tree.map(lambda x, o: to_varying(x, tuple(varying_axes(o))),
                       init, out)
    if all(varying_axes(a) == varying_axes(b) for a, b in
           zip(jax.tree.leaves(new), jax.tree.leaves(init), strict=True)):
      return new
    init = new
  return init


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


def _param_spec(leaf, axes) -> P:
  spec = _known_spec(leaf)
  if spec is None:
    return P()
  entries = []
  for entry in spec:
    kept = tuple(a for a in _axes_tuple(entry) if a in axes)
    entries.append(kept[0] if len(kept) == 1 else (kept or None))
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def plan(
    mesh: Any,
    axis_name: Any,
    fsdp_reduce: str,
    params: Any,
    batch: Any,
    num_microbatches: int,
) -> Plan | None:
  """Decides whether and how to split the loop over the mesh.

  Returns ``None`` (run the plain scan) when there is no mesh, or the batch
  is not sharded over any axis of size > 1.
  """
  if fsdp_reduce not in FSDP_REDUCE:
    raise ValueError(
        f'fsdp_reduce must be one of {FSDP_REDUCE}, got {fsdp_reduce!r}.'
    )
  mesh = _resolve_mesh(mesh, batch)
  if mesh is None or mesh.empty:
    if axis_name is not None:
      raise ValueError(
          f'axis_name={axis_name!r} was given but there is no mesh: set one '
          'with `with jax.set_mesh(mesh):` or pass mesh=.'
      )
    return None
  axes = _batch_axes(mesh, axis_name, batch)
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
    param_specs = jax.tree.map(lambda _: P(), params)
  else:
    param_specs = jax.tree.map(lambda p: _param_spec(p, axes), params)
  return Plan(mesh, axes, num_shards, param_specs, fsdp_reduce, inside)


def _gather(x, spec: P):
  for dim, entry in enumerate(spec):
    if entry is not None:
      x = jax.lax.all_gather(x, entry, axis=dim, tiled=True)
  return x


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


def _reduce_leaf(a, axes):
  """Sums over the devices; booleans are OR-ed."""
  if a.dtype == jnp.bool_:
    return _psum(a.astype(jnp.int32), axes) > 0
  return _psum(a, axes)


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


def _weighted_mean(a, weights, total, axes):
  """Per micro-batch (leading axis) weighted mean over the devices."""
  w = weights.reshape(weights.shape + (1,) * (a.ndim - 1))
  safe = jnp.where(total > 0, total, 1.0).reshape(w.shape)
  wide = jnp.promote_types(a.dtype, jnp.float32)
  return (_psum(w.astype(wide) * a.astype(wide), axes)
          / safe.astype(wide)).astype(a.dtype)


def _weight_of(weight_fn, microbatch):
  if weight_fn is None:
    return jnp.ones([], jnp.float32)
  weight = weight_fn(microbatch)
  if jnp.ndim(weight) != 0:
    raise ValueError(
        'weight_fn must return a scalar weight per micro-batch, got an array '
        f'of shape {jnp.shape(weight)}.'
    )
  _nonfinite.check_concrete_weight(weight, 'The weight_fn weight')
  weight = jnp.asarray(weight, jnp.float32)
  # As in the loop: a traced negative weight counts as 0.
  return jnp.where(weight < 0, jnp.zeros_like(weight), weight)


def _global_like(param, grad_like):
  """The gradient's global shape, dtype and (explicit) sharding: zeros made
  from it (an empty window's updates) match the real updates' type."""
  sharding = None
  if _known_spec(param) is not None:
    mesh = jax.typeof(param).sharding.mesh
    if AxisType.Explicit in mesh.axis_types:
      sharding = jax.typeof(param).sharding
  return jax.ShapeDtypeStruct(jnp.shape(param), grad_like.dtype,
                              sharding=sharding)


def _plain(like):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), like)


def scan(
    plan_: Plan,
    local_scan: Callable[..., Any],
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    has_aux: bool,
    weight_fn: Callable[[Any], Any] | None,
    stack_aux: bool,
    init_grads: Any,
    init_weight: jax.Array | None,
    rng_kwarg: str,
    sums_type: Any,
    no_carry: Any = None,
    **options: Any,
):
  """``local_scan`` on every device's rows, reduced once after the loop.

  Same contract as :func:`accum_jax._scan.scan_microbatches`.
  """
  axes = plan_.axes
  specs = plan_.param_specs
  per_step = plan_.fsdp_reduce == 'per_step'
  scattered = not per_step and any(len(s) for s in jax.tree.leaves(specs))
  nonfinite = options.get('nonfinite', 'propagate')
  if scattered and nonfinite != 'propagate':
    raise ValueError(
        f"nonfinite={nonfinite!r} with parameters sharded over the batch axes "
        f"{axes} needs fsdp_reduce='per_step': with 'per_microbatch' a "
        'gradient is reduce-scattered before it can be screened, so no device '
        'sees a whole micro-batch gradient.'
    )
  num_real = options.pop('num_real', None)
  carry = options.pop('carry', no_carry)
  has_carry = carry is not no_carry
  likes = {}

  def device_fn(params, batch, args, kwargs, num_real, carry):
    if kwargs.get(rng_kwarg) is not None:
      # Devices draw independent keys for their rows of a micro-batch.
      index = jax.lax.axis_index(axes)
      kwargs = {**kwargs, rng_kwarg: jax.tree.map(
          lambda key: jax.random.fold_in(key, index), kwargs[rng_kwarg])}
    gathered = loss_fn
    if per_step:
      params = jax.tree.map(_gather, params, specs)
    elif scattered:

      def gathered(shards, microbatch, *a, **kw):
        return loss_fn(jax.tree.map(_gather, shards, specs), microbatch, *a,
                       **kw)

    # With the gradient reduce-scattered inside the differentiated function,
    # each device's weight must be applied before that reduction: the loss is
    # pre-weighted and the loop sums with unit weights. The weights also
    # travel as aux when the aux is stacked (for the mean over devices).
    pre_weight = scattered and (weight_fn is not None or has_aux)
    carry_weight = pre_weight or (stack_aux and has_aux)
    fn = gathered
    if carry_weight:

      def fn(p, microbatch, *a, **kw):
        out = gathered(p, microbatch, *a, **kw)
        value, aux = out if has_aux else (out, None)
        weight = _weight_of(weight_fn, microbatch)
        if pre_weight:
          likes['value'] = jax.ShapeDtypeStruct(jnp.shape(value),
                                                jnp.result_type(value))
          value = weight.astype(jnp.result_type(value)) * value
          if not stack_aux:
            aux = jax.tree.map(
                lambda x: weight.astype(x.dtype) * x
                if jnp.issubdtype(x.dtype, jnp.floating) else x, aux)
        return value, (aux, weight)

    # Invariant (replicated) params would get a psum in the loop body.
    params = jax.tree.map(lambda p: to_varying(p, axes), params)
    sums, value_like, aux_like, grads_like = local_scan(
        fn, params, batch, args, kwargs, has_aux=has_aux or carry_weight,
        weight_fn=None if pre_weight else weight_fn, stack_aux=stack_aux,
        num_real=num_real, **options,
        **({'carry': carry} if has_carry else {}))
    likes.setdefault('value', value_like)
    likes.update(aux=aux_like[0] if carry_weight else aux_like,
                 grads=grads_like)
    grads = jax.tree.map(
        lambda g, s: _reduce_grad(g, s, axes, scatter=per_step), sums.grads,
        specs)
    aux, weight = sums.aux, sums.weight
    if carry_weight:
      aux, weights = aux
      if pre_weight:
        weight = jnp.sum(weights) if stack_aux else weights
      if not has_aux:
        aux = likes['aux'] = None
    if stack_aux and has_aux:
      # Per micro-batch, the weighted mean over the devices, as over the loop.
      total = _psum(weights, axes)
      aux = jax.tree.map(
          lambda a: _weighted_mean(a, weights, total, axes)
          if jnp.issubdtype(a.dtype, jnp.floating) else _reduce_leaf(a, axes),
          aux)
    elif aux is not None:
      # Weighted sums (floats), counts (ints), any (bools): sum over devices.
      aux = jax.tree.map(lambda a: _reduce_leaf(a, axes), aux)
    bad = None if sums.bad is None else _psum(sums.bad, axes)
    new_carry = jax.tree.map(lambda c: _agree(c, axes), sums.carry)
    return (grads, _psum(weight, axes), _psum(sums.value, axes), aux, bad,
            new_carry)

  if plan_.inside:
    run = device_fn
  else:
    run = jax.shard_map(
        device_fn, mesh=plan_.mesh,
        in_specs=(specs, P(axes), P(), P(), P(), P()),
        out_specs=(specs, P(), P(), P(), P(), P()),
        axis_names=frozenset(axes))
  grads, weight, value, aux, bad, new_carry = run(
      params, batch, args, kwargs, num_real, carry if has_carry else None)
  if weight_fn is None:
    # Unit weights: a device's share of a micro-batch weighs 1 / num_shards,
    # so a micro-batch weighs 1 as on one device (the mean is unchanged, and
    # a window left part-full by cross-step updates is weighted the same).
    scale = 1.0 / plan_.num_shards

    def shrink(x):
      return x * jnp.asarray(scale, x.dtype)

    grads, weight, value = jax.tree.map(shrink, (grads, weight, value))
    if aux is not None and not stack_aux:
      aux = jax.tree.map(
          lambda a: shrink(a) if jnp.issubdtype(a.dtype, jnp.floating) else a,
          aux)
  if init_grads is not None:
    # A window left part-full before this call joins this step's sums.
    grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype), init_grads, grads)
    weight = init_weight + weight
  grads_like = jax.tree.map(_global_like, params, likes['grads'])
  sums = sums_type(grads, weight, value, aux, bad,
                   new_carry if has_carry else None)
  return sums, _plain(likes['value']), _plain(likes['aux']), grads_like
