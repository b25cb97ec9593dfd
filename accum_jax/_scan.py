"""The in-step drivers: one optimizer step (or gradient) over a whole batch.

:func:`value_and_grad` and :func:`value_and_update` each build one
:class:`accum_jax._loop.Loop` and run it with :func:`run`: on one device the
plain loop (:func:`accum_jax._loop.scan`), on a mesh whose batch axes shard
the batch the same loop per device, reduced once after it
(:func:`accum_jax._sharding.scan`). :func:`optimizer_step` is the body of
:func:`value_and_update`, shared with the Flax helpers.
"""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from accum_jax import _accumulate, _checks, _loop, _nonfinite, _sharding, _sums


def run(loop: _loop.Loop, inp: _loop.Inputs,
        start: Any = None) -> _loop.Result:
  """Runs ``loop`` here, or split over the mesh that shards the batch;
  ``start`` is the gradient sum of a window left part-full."""
  plan = _sharding.plan(loop.mesh, loop.axis_name, loop.fsdp_reduce,
                        inp.params, inp.batch, loop.num_microbatches)
  if plan is None:
    return _loop.scan(loop, inp, start)
  return _sharding.scan(plan, loop, inp, start)


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
  loop = _loop.Loop(
      loss_fn, _checks.check_num_microbatches(num_microbatches),
      has_aux=has_aux, weight_fn=weight_fn,
      accumulator_dtype=accumulator_dtype, stack_aux=stack_aux, remat=remat,
      mesh=mesh, axis_name=axis_name, fsdp_reduce=fsdp_reduce)

  def f(params, batch, *args, **kwargs):
    result = run(loop, _loop.inputs(loop, params, batch, args, kwargs))
    grads = _sums.mean_of(result.sums.grads, result.sums.weight,
                          result.shapes.grads)
    return result.sums.finish(result.shapes, has_aux), grads

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
        'accum_jax.accumulate(optax.adam(1e-3), num_microbatches=8). If tx '
        'already contains an accumulate (nested in optax.chain, '
        'inject_hyperparams or multi_transform), the transforms around it would'
        ' run on every micro-batch: accumulate the whole optimizer instead, '
        'accum_jax.accumulate(optax.chain(...), k), '
        'accum_jax.accumulate(optax.inject_hyperparams(...)(...), k) or '
        'accum_jax.accumulate(optax.multi_transform(...), k).'
    )
  loop = for_transform(tx, loss_fn, 'value_and_update', has_aux=has_aux,
                       weight_fn=weight_fn, stack_aux=stack_aux, remat=remat,
                       mesh=mesh, axis_name=axis_name, fsdp_reduce=fsdp_reduce)

  def f(params, opt_state, batch, *args, **kwargs):
    value, updates, opt_state, _ = optimizer_step(
        loop, tx, _loop.inputs(loop, params, batch, args, kwargs), opt_state)
    return value, updates, opt_state

  return f


def for_transform(tx: _accumulate.AccumulateTransformation,
                  loss_fn: Callable[..., Any], who: str,
                  **options: Any) -> _loop.Loop:
  """The :class:`accum_jax._loop.Loop` of an ``accumulate`` transform's step:
  its ``k``, accumulator dtype and non-finite policy."""
  config = tx.config
  return _loop.Loop(loss_fn, config.static_num_microbatches(who),
                    accumulator_dtype=config.accumulator_dtype,
                    nonfinite=config.nonfinite,
                    track_noise_scale=config.track_noise_scale, **options)


def optimizer_step(loop: _loop.Loop, tx: Any, inp: _loop.Inputs,
                   opt_state: Any) -> tuple[Any, Any, Any, Any]:
  """One optimizer step over ``inp.batch``: ``(value, updates, opt_state,
  state)``, with ``state`` the threaded state after the last micro-batch.

  With an ``accumulate`` ``tx`` its accumulator is the loop's carry and its
  inner optimizer runs once, after the loop; with a plain optimizer the mean
  gradient is formed in a fresh accumulator and ``tx.update`` applied once.
  """
  if not isinstance(tx, _accumulate.AccumulateTransformation):
    result = run(loop, inp)
    grads = _sums.mean_of(result.sums.grads, result.sums.weight,
                          result.shapes.grads)
    updates, opt_state = tx.update(grads, opt_state, inp.params)
    return (result.sums.finish(result.shapes, loop.has_aux), updates,
            opt_state, result.state)
  if not isinstance(opt_state, _accumulate.AccumulateState):
    raise TypeError(
        'value_and_update expects the AccumulateState made by tx.init, got '
        f'{type(opt_state).__name__}.'
    )
  tx.config.check_state(opt_state, inp.params, 'value_and_update')
  result = run(loop, inp, opt_state.acc)
  sums = result.sums
  noise = opt_state.noise
  if sums.noise is not None:
    noise = noise._replace(window=noise.window + sums.noise)
  summed = _nonfinite.count_bad(
      opt_state._replace(acc=sums.grads, weight=opt_state.weight + sums.weight,
                         noise=noise),
      sums.bad)
  # With unit weights, all micro-batches real and nothing skipped, the
  # window's weight is >= k > 0: no empty-window guard (it costs memory).
  guard = loop.screened or inp.num_real is not None
  updates, opt_state = tx.config.finish_window(
      summed, result.shapes.grads, inp.params, {}, guard=guard)
  return sums.finish(result.shapes, loop.has_aux), updates, opt_state, result.state
