"""The in-step drivers: one ``lax.scan`` over the micro-batches of a batch.

Both :func:`value_and_grad` and :func:`value_and_update` run the same loop
(:func:`scan_microbatches`): the carry (gradient sum, weight sum, value sum,
reduced aux) is built from ``jax.eval_shape``, never by running a micro-batch
outside the loop, and each micro-batch is differentiated inside the loop body.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from accum_jax import (
  _accumulate,
  _config,
  _nonfinite,
  _sharding,
  _split,
  _window,
)

RNG_KWARG = 'rng'


class _Sums(NamedTuple):
  grads: Any   # sum_j w_j g_j, accumulator dtype
  weight: jax.Array  # sum_j w_j, float32
  value: jax.Array  # sum_j w_j L_j, float32
  aux: Any  # reduced aux (see _reduce_aux), or None
  bad: Any = None  # int32 count of micro-batches dropped as non-finite
  carry: Any = None  # extra state threaded through loss_fn (see `carry`)


# Marks "no extra carry": ``None`` is itself a valid (empty) carry pytree.
NO_CARRY = object()


def _fold_rng(kwargs: dict[str, Any], index: jax.Array) -> dict[str, Any]:
  """Gives micro-batch ``index`` its own key(s): ``fold_in(rng, index)``."""
  if RNG_KWARG not in kwargs or kwargs[RNG_KWARG] is None:
    return kwargs
  rng = jax.tree.map(lambda key: jax.random.fold_in(key, index),
                     kwargs[RNG_KWARG])
  return {**kwargs, RNG_KWARG: rng}


def _aux_sum_dtype(dtype):
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def _reduce_aux_step(carry, aux, weight):
  """Floating leaves: weighted sum (divided at the end); ints: sum; bools: any."""

  def step(c, a):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating):
      return c + weight.astype(c.dtype) * a.astype(c.dtype)
    if a.dtype == jnp.bool_:
      return c | a
    return c + a

  return jax.tree.map(step, carry, aux)


def _finish_aux(carry, aux_like, total_weight):
  safe = jnp.where(total_weight > 0, total_weight, 1.0)

  def finish(c, like):
    if jnp.issubdtype(c.dtype, jnp.floating):
      return (c / safe.astype(c.dtype)).astype(like.dtype)
    return c

  return jax.tree.map(finish, carry, aux_like)


def _wrap_loss(loss_fn, has_aux, remat, has_carry=False, scaled=False):
  """Returns ``(params, mb, args, kwargs) -> ((value, (aux, carry)), grads)``.

  With ``scaled``, returns ``(params, mb, args, kwargs, weight) -> ((weight *
  value, (value, (aux, carry))), weight * grads)``.
  """

  def loss(params, microbatch, args, kwargs):
    out = loss_fn(params, microbatch, *args, **kwargs)
    new_carry = None
    if has_carry:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            'With a carried state, loss_fn must return (out, new_state), where '
            'out is the loss (or (loss, aux) with has_aux=True); got '
            f'{type(out).__name__}'
            + (f' of length {len(out)}' if isinstance(out, (tuple, list))
               else '') + '.'
        )
      out, new_carry = out
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        if isinstance(out, (tuple, list)):
          got = f'a {type(out).__name__} of length {len(out)}'
        elif hasattr(out, 'shape'):
          got = f'a single array of shape {jnp.shape(out)}'
        else:
          got = type(out).__name__
        raise TypeError(
            f'With has_aux=True, loss_fn must return a pair (loss, aux); got '
            f'{got}.'
        )
      value, aux = out
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(
            f'loss_fn returned a {type(out).__name__} of length {len(out)}; '
            'if it returns (loss, aux), pass has_aux=True.'
        )
      value, aux = out, None
    if jnp.shape(value) != ():
      raise TypeError(
          'loss_fn must return a scalar loss, got shape '
          f'{jnp.shape(value)}.'
      )
    if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
      raise TypeError(
          f'loss_fn must return a floating loss, got {jnp.result_type(value)}.'
      )
    return value, (aux, new_carry)

  if remat is not None and remat is not False:
    policy = None if remat is True else remat
    loss = jax.checkpoint(loss, policy=policy, static_argnums=())
  if scaled:
    def weighted(params, microbatch, args, kwargs, weight):
      value, aux = loss(params, microbatch, args, kwargs)
      return weight.astype(value.dtype) * value, (value, aux)
    return jax.value_and_grad(weighted, has_aux=True)
  return jax.value_and_grad(loss, has_aux=True)


def scan_microbatches(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_microbatches: int,
    has_aux: bool,
    weight_fn: Callable[[Any], Any] | None,
    accumulator_dtype: Any,
    stack_aux: bool,
    remat: Any,
    init_grads: Any = None,
    init_weight: jax.Array | None = None,
    nonfinite: str = 'propagate',
    num_real: jax.Array | None = None,
    carry: Any = NO_CARRY,
    mesh: Any = None,
    axis_name: Any = None,
    fsdp_reduce: str = 'per_microbatch',
):
  """Runs ``loss_fn`` on every micro-batch of ``batch`` in one ``lax.scan``.

  With ``carry`` (a pytree, e.g. BatchNorm statistics), micro-batch ``j`` is
  evaluated as ``loss_fn(params, microbatch_j, carry_j, *args, **kwargs)``
  and must return ``(out, carry_{j+1})``: the state is threaded through the
  micro-batches in order, and ``sums.carry`` holds the last one. The carry is
  not differentiated; a padding micro-batch, or one dropped as non-finite,
  leaves it unchanged.

  On a mesh whose batch axes shard ``batch`` (see :mod:`accum_jax._sharding`)
  each device scans its own rows and the sums are reduced once, after the loop.

  Returns:
    ``(sums, value_like, aux_like, grads_like)``: the weighted sums, the
    abstract loss, aux and gradient of one micro-batch (for dtypes).
    ``sums.aux`` is the stacked aux when ``stack_aux``.
  """
  options = dict(num_microbatches=num_microbatches, has_aux=has_aux,
                 weight_fn=weight_fn, accumulator_dtype=accumulator_dtype,
                 stack_aux=stack_aux, remat=remat, nonfinite=nonfinite,
                 num_real=num_real, carry=carry)
  plan = _sharding.plan(mesh, axis_name, fsdp_reduce, params, batch,
                        num_microbatches)
  if plan is None:
    return _scan_local(loss_fn, params, batch, args, kwargs, **options,
                       init_grads=init_grads, init_weight=init_weight)
  return _sharding.scan(plan, _scan_local, loss_fn, params, batch, args,
                        kwargs, **options, init_grads=init_grads,
                        init_weight=init_weight, rng_kwarg=RNG_KWARG,
                        sums_type=_Sums, no_carry=NO_CARRY)


def _scan_local(
    loss_fn, params, batch, args, kwargs, *, num_microbatches, has_aux,
    weight_fn, accumulator_dtype, stack_aux, remat, init_grads=None,
    init_weight=None, nonfinite='propagate', num_real=None, carry=NO_CARRY,
):
  """:func:`scan_microbatches` on the rows this device holds."""
  k = num_microbatches
  _accumulate.check_floating(params, 'Params')
  reshaped = _split.reshape_batch(batch, k)
  has_carry = carry is not NO_CARRY
  grad_fn = _wrap_loss(loss_fn, has_aux, remat, has_carry)
  scaled_grad_fn = _wrap_loss(loss_fn, has_aux, remat, has_carry, scaled=True)

  def one(index, state, prescale=False):
    microbatch = _split.take_microbatch(reshaped, index)
    extra = (state,) if has_carry else ()
    if weight_fn is None:
      weight = jnp.ones([], jnp.float32)
    else:
      # Clamped here, before it seeds the backward pass: a traced negative
      # weight counts as 0.
      weight = _accumulate.check_weight(weight_fn(microbatch),
                                        from_weight_fn=True)
      weight = jnp.where(weight < 0, jnp.zeros_like(weight), weight)
    if prescale:
      (_, (value, (aux, new_state))), grads = scaled_grad_fn(
          params, microbatch, extra + tuple(args), _fold_rng(kwargs, index),
          weight)
    else:
      (value, (aux, new_state)), grads = grad_fn(
          params, microbatch, extra + tuple(args), _fold_rng(kwargs, index))
    return value, aux, grads, weight, new_state

  index0 = jax.ShapeDtypeStruct((), jnp.int32)
  carry0 = carry if has_carry else None
  *outs_like, carry_like = jax.eval_shape(one, index0, carry0)
  value_like, aux_like, grads_like, _ = outs_like
  _accumulate.check_floating(grads_like, 'Gradient')
  # Differentiating weight * loss seeds the backward pass with the weight, so
  # the gradient adds straight into the carry; scaling it afterwards kept a
  # scatter gradient (an embedding's) in a buffer of its own (+3% on an LM).
  # Not for a bf16/fp16 loss, whose seed would round the weight.
  prescale = (weight_fn is not None
              and jnp.finfo(value_like.dtype).bits >= 32)
  if has_carry:
    _check_carry(carry_like, carry0)

  if init_grads is None:
    init_grads = jax.tree.map(
        lambda g: jnp.zeros(g.shape, _accumulate.acc_dtype(g.dtype,
                                                          accumulator_dtype)),
        grads_like)
    init_weight = jnp.zeros([], jnp.float32)
  aux0 = None
  if has_aux and not stack_aux:
    aux0 = jax.tree.map(
        lambda a: jnp.zeros(a.shape, _aux_sum_dtype(a.dtype)), aux_like)
  bad0 = None if nonfinite == 'propagate' else jnp.zeros([], jnp.int32)
  init = _Sums(init_grads, init_weight, jnp.zeros([], jnp.float32), aux0,
               bad0, carry0)
  # Without weights, padding or a skip policy every micro-batch adds w=1.
  screened = (weight_fn is not None or num_real is not None
              or nonfinite != 'propagate')

  @functools.partial(jax.named_call, name='accum_jax_microbatch')
  def body(sums, index):
    if num_real is None:
      value, aux, grads, weight, state = one(index, sums.carry, prescale)
    else:
      # Padding micro-batches are not computed at all.
      value, aux, grads, weight, state = jax.lax.cond(
          index < num_real, functools.partial(one, prescale=prescale),
          lambda _, state: (*jax.tree.map(
              _sharding.zeros_like_struct, outs_like), state),
          index, sums.carry)
    bad = None
    if screened:
      value, aux, grads, weight, bad = _nonfinite.screen(
          nonfinite, grads, weight, weighted=weight_fn is not None,
          real=None if num_real is None else index < num_real, value=value,
          aux=aux)
      if has_carry and bad is not None:  # a dropped micro-batch: keep state
        state = jax.tree.map(lambda old, new: jnp.where(bad > 0, old, new),
                             sums.carry, state)
    new = _Sums(
        # A prescaled gradient already carries its weight.
        grads=_accumulate.add_weighted(
            sums.grads, grads, jnp.ones_like(weight) if prescale else weight),
        weight=sums.weight + weight,
        value=sums.value + weight * value.astype(jnp.float32),
        aux=(None if sums.aux is None
             else _reduce_aux_step(sums.aux, aux, weight)),
        bad=None if sums.bad is None else sums.bad + bad,
        carry=state,
    )
    return new, (aux if stack_aux else None)

  init = _sharding.match_carry(body, init)  # no-op outside shard_map
  sums, stacked = jax.lax.scan(body, init, jnp.arange(k, dtype=jnp.int32))
  if stack_aux:
    sums = sums._replace(aux=stacked)
  return sums, value_like, aux_like, grads_like


def _check_carry(new_like, carry):
  """The state loss_fn returns must match the state it was given."""
  if jax.tree.structure(new_like) != jax.tree.structure(carry):
    raise ValueError(
        'loss_fn must return its new state with the structure of the state it '
        f'was given:\n  given: {jax.tree.structure(carry)}\n  returned: '
        f'{jax.tree.structure(new_like)}'
    )
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(new_like),
                              jax.tree.leaves(carry), strict=True):
    if (jnp.shape(new), jnp.result_type(new)) != (jnp.shape(old),
                                                  jnp.result_type(old)):
      raise ValueError(
          f'loss_fn returned state leaf {jax.tree_util.keystr(path)} with '
          f'shape {jnp.shape(new)} and dtype {jnp.result_type(new)}, but it was'
          f' given shape {jnp.shape(old)} and dtype {jnp.result_type(old)}.'
      )


def _finish_value(sums, value_like, aux_like, has_aux, stack_aux):
  safe = jnp.where(sums.weight > 0, sums.weight, 1.0)
  value = (sums.value / safe).astype(value_like.dtype)
  if not has_aux:
    return value
  aux = sums.aux if stack_aux else _finish_aux(sums.aux, aux_like, sums.weight)
  return value, aux


def value_and_grad(
    loss_fn: Callable[..., Any],
    num_microbatches: int,
    *,
    has_aux: bool = False,
    weight_fn: Callable[[Any], Any] | None = None,
    accumulator_dtype: Any | None = jnp.float32,
    stack_aux: bool = False,
    remat: Any = None,
    mesh: Any = None,
    axis_name: Any = None,
    fsdp_reduce: str = 'per_microbatch',
) -> Callable[..., Any]:
  r"""A micro-batched drop-in for ``jax.value_and_grad(loss_fn)``.

  ``value_and_grad(loss_fn, k)(params, batch, *args, **kwargs)`` returns what
  ``jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch, *args,
  **kwargs)`` returns on the full batch, computed one micro-batch at a time in
  a ``lax.scan``, so the activations of only one micro-batch are live.

  Semantics:

  * **Split.** ``batch`` is a pytree whose leaves share a leading batch axis
    of size ``B``, a multiple of ``k``. Micro-batch ``j`` takes rows ``j, j+k,
    j+2k, ...`` (a strided split), so a batch sharded along its leading axis
    stays sharded with no data movement. ``*args`` and the other keyword
    arguments are passed unchanged to every micro-batch.
  * **Weighting.** The result is :math:`\sum_j w_j L_j / \sum_j w_j` and its
    gradient, where :math:`L_j` is ``loss_fn`` on micro-batch ``j`` and
    :math:`w_j` is ``weight_fn(microbatch_j)`` (default 1). With a mean loss
    and no ``weight_fn`` this is the full-batch mean. For a token-mean loss
    over padded sequences, let ``loss_fn`` return the mean over the
    micro-batch's real tokens and ``weight_fn`` the count of real tokens: the
    result is then exactly the full-batch token mean, whatever the padding per
    micro-batch. A batch whose weights sum to 0 gives 0 and zero gradients.
  * **Aux.** Floating aux leaves are weighted means like the loss, integer
    leaves are summed (counts), boolean leaves are OR-ed. With
    ``stack_aux=True`` the aux leaves are returned stacked instead, with a
    leading axis of size ``k``.
  * **RNG.** A PRNG key (or a pytree of keys) passed as the keyword ``rng=``
    reaches micro-batch ``j`` as ``jax.random.fold_in(rng, j)``, so every
    micro-batch gets its own dropout mask.
  * **Dtypes.** Gradients are summed in ``promote_types(grad_dtype,
    accumulator_dtype)`` (float32 for bf16 gradients by default) and returned
    in the gradients' dtype.
  * **Ragged batches.** The keyword ``num_real_microbatches=r`` (an int or a
    traced int32 scalar, taken out of ``**kwargs``) marks micro-batches ``r,
    ..., k-1`` as padding: they are not computed, have weight 0, and the
    result is that of the ``r`` real ones, with one compilation for every
    ``r``. A micro-batch of weight 0 from ``weight_fn`` adds ``0 * grads``:
    exact zeros unless its gradient is non-finite (guard a token mean's
    denominator, or use a skip policy, which drops it whatever its gradient).
  * **Mesh.** Under ``jax.jit`` with a mesh set (``with
    jax.set_mesh(mesh):``) and a batch sharded along its leading axis over
    some mesh axes (the *batch axes*, read from the batch's sharding), every
    device accumulates its own rows and the gradients are reduced across
    devices **once**, after the loop, whatever ``k``. Each device's share of
    a micro-batch counts as a piece of its own, of weight ``weight_fn(share)``
    (or ``1 / shards``): the result is the sum of ``w L`` over all devices
    and micro-batches divided by the global sum of ``w``, which for mean
    losses, with or without token-count weights, is the full-batch value.
    Parameters sharded over a batch axis (FSDP) get their gradients in their
    own sharding, reduce-scattered once per micro-batch into a sharded
    accumulator (``fsdp_reduce='per_microbatch'``, the default) or once per
    step from a local unsharded accumulator (``'per_step'``). The ``rng``
    key is also folded with the device's index along the batch axes. See
    ``docs/scaling.md``.

  Args:
    loss_fn: ``loss_fn(params, batch, *args, **kwargs)`` returning a scalar
      loss, or ``(loss, aux)`` with ``has_aux=True``.
    num_microbatches: ``k``, the number of micro-batches.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    weight_fn: ``weight_fn(microbatch) -> scalar`` weight of a micro-batch.
    accumulator_dtype: see above; ``None`` sums in the gradients' dtype.
    stack_aux: return per-micro-batch aux stacked instead of reduced.
    remat: ``None`` (no rematerialisation), ``True`` (``jax.checkpoint`` the
      per-micro-batch loss) or a ``jax.checkpoint_policies`` policy.
    mesh: the mesh to split the loop over; by default the mesh set with
      ``jax.set_mesh``, or the one carried by the batch's sharding.
    axis_name: the batch axes (a mesh axis name or a tuple of them); by
      default the axes sharding the batch's leading dimension, which is known
      for explicit mesh axes (``jax.make_mesh``'s default). Pass it for a
      mesh with ``AxisType.Auto`` axes, or inside a ``shard_map`` that is
      manual over these axes, to get the one reduction after the loop.
    fsdp_reduce: ``'per_microbatch'`` or ``'per_step'``: when gradients of
      parameters sharded over a batch axis are reduce-scattered (see above).

  Returns:
    ``f(params, batch, *args, **kwargs)`` returning ``(value, grads)`` or
    ``((value, aux), grads)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import accum_jax
    >>> def loss_fn(w, batch):
    ...   return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> batch = {'x': jnp.arange(16.0).reshape(8, 2), 'y': jnp.arange(8.0)}
    >>> w = jnp.array([0.5, -0.25])
    >>> loss, grads = accum_jax.value_and_grad(loss_fn, 4)(w, batch)
    >>> ref_loss, ref_grads = jax.value_and_grad(loss_fn)(w, batch)
    >>> bool(jnp.allclose(loss, ref_loss) and jnp.allclose(grads, ref_grads))
    True
  """
  num_microbatches = _split.check_num_microbatches(num_microbatches)

  def f(params, batch, *args, **kwargs):
    num_real, kwargs = _window.pop_num_real(kwargs, num_microbatches)
    sums, value_like, aux_like, grads_like = scan_microbatches(
        loss_fn, params, batch, args, kwargs,
        num_microbatches=num_microbatches, has_aux=has_aux,
        weight_fn=weight_fn, accumulator_dtype=accumulator_dtype,
        stack_aux=stack_aux, remat=remat, num_real=num_real, mesh=mesh,
        axis_name=axis_name, fsdp_reduce=fsdp_reduce)
    grads = _accumulate.mean_of(sums.grads, sums.weight, grads_like)
    return _finish_value(sums, value_like, aux_like, has_aux, stack_aux), grads

  return f


def value_and_update(
    loss_fn: Callable[..., Any],
    tx: _accumulate.AccumulateTransformation,
    *,
    has_aux: bool = False,
    weight_fn: Callable[[Any], Any] | None = None,
    stack_aux: bool = False,
    remat: Any = None,
    mesh: Any = None,
    axis_name: Any = None,
    fsdp_reduce: str = 'per_microbatch',
) -> Callable[..., Any]:
  """One optimizer step over a whole batch, micro-batched in one ``lax.scan``.

  ``value_and_update(loss_fn, tx)(params, opt_state, batch, *args, **kwargs)``
  returns ``(value, updates, opt_state)``. ``tx`` is an :func:`accumulate`
  transform; its accumulator and weight sum are the scan's carry, over its
  ``num_microbatches`` micro-batches, and its inner optimizer is applied
  **once**, after the loop. One call is one optimizer step: the inner step
  count and any schedule advance by exactly one, and ``opt_state`` comes back
  at a window boundary (``count == 0``).

  The split, weighting, aux, RNG, dtype, mesh and ``num_real_microbatches=``
  rules are those of :func:`value_and_grad`; ``tx``'s ``nonfinite`` policy is
  applied to every micro-batch (its gradient, weight and loss). Call it on a
  state at a window boundary, which is where it always leaves it; a window
  left half-full by cross-step ``tx.update`` calls is folded into this step's
  mean.

  Args:
    loss_fn: ``loss_fn(params, batch, *args, **kwargs)`` returning a scalar
      loss, or ``(loss, aux)`` with ``has_aux=True``.
    tx: a transform made by :func:`accumulate`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    weight_fn: ``weight_fn(microbatch) -> scalar`` weight of a micro-batch.
    stack_aux: return per-micro-batch aux stacked instead of reduced.
    remat: as in :func:`value_and_grad`.
    mesh: as in :func:`value_and_grad`.
    axis_name: as in :func:`value_and_grad`.
    fsdp_reduce: as in :func:`value_and_grad`.

  Returns:
    ``f(params, opt_state, batch, *args, **kwargs)`` returning ``(value,
    updates, opt_state)``, where ``value`` is ``loss`` or ``(loss, aux)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import accum_jax
    >>> def loss_fn(w, batch):
    ...   return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> batch = {'x': jnp.arange(16.0).reshape(8, 2), 'y': jnp.arange(8.0)}
    >>> w = jnp.array([0.5, -0.25])
    >>> tx = accum_jax.accumulate(optax.sgd(0.01), num_microbatches=4)
    >>> step = jax.jit(accum_jax.value_and_update(loss_fn, tx))
    >>> loss, updates, opt_state = step(w, tx.init(w), batch)
    >>> ref = -0.01 * jax.grad(loss_fn)(w, batch)
    >>> bool(jnp.allclose(updates, ref))
    True
  """
  if not isinstance(tx, _accumulate.AccumulateTransformation):
    raise TypeError(
        'value_and_update needs a transform made by accum_jax.accumulate(inner,'
        f' num_microbatches), got {type(tx).__name__}. Wrap your optimizer: '
        'accum_jax.accumulate(optax.adam(1e-3), num_microbatches=8).'
    )
  num_microbatches = _window.static_num_microbatches(tx, 'value_and_update')

  def f(params, opt_state, batch, *args, **kwargs):
    value, updates, opt_state, _ = update_step(
        loss_fn, tx, num_microbatches, params, opt_state, batch, args, kwargs,
        has_aux=has_aux, weight_fn=weight_fn, stack_aux=stack_aux,
        remat=remat, mesh=mesh, axis_name=axis_name, fsdp_reduce=fsdp_reduce)
    return value, updates, opt_state

  return f


def update_step(loss_fn, tx, num_microbatches, params, opt_state, batch, args,
                kwargs, *, has_aux, weight_fn, stack_aux, remat,
                carry=NO_CARRY, mesh=None, axis_name=None,
                fsdp_reduce='per_microbatch'):
  """The body of :func:`value_and_update`, with an optional ``carry``.

  Returns ``(value, updates, opt_state, carry)``; the Flax helpers use it to
  thread model state (BatchNorm statistics, RNG streams) through the loop.
  """
  if not isinstance(opt_state, _accumulate.AccumulateState):
    raise TypeError(
        'value_and_update expects the AccumulateState made by tx.init, got '
        f'{type(opt_state).__name__}.'
    )
  _accumulate.check_same_structure(params, opt_state.acc, 'params',
                                   'accumulator')
  _config.check_state(tx, opt_state, params)
  num_real, kwargs = _window.pop_num_real(kwargs, num_microbatches)
  sums, value_like, aux_like, grads_like = scan_microbatches(
      loss_fn, params, batch, args, kwargs,
      num_microbatches=num_microbatches, has_aux=has_aux,
      weight_fn=weight_fn, accumulator_dtype=tx.accumulator_dtype,
      stack_aux=stack_aux, remat=remat, init_grads=opt_state.acc,
      init_weight=opt_state.weight, nonfinite=tx.nonfinite,
      num_real=num_real, carry=carry, mesh=mesh, axis_name=axis_name,
      fsdp_reduce=fsdp_reduce)
  summed = _nonfinite.count_bad(
      opt_state._replace(acc=sums.grads, weight=sums.weight), sums.bad)
  # With unit weights, all micro-batches real and nothing skipped, the
  # window's weight is >= k > 0: no empty-window guard (it costs memory).
  guard = (weight_fn is not None or num_real is not None
           or tx.nonfinite != 'propagate')
  updates, opt_state = _accumulate.finish_window(
      tx, summed, grads_like, params, {}, guard=guard)
  value = _finish_value(sums, value_like, aux_like, has_aux, stack_aux)
  return value, updates, opt_state, sums.carry
