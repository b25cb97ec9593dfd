"""The in-step drivers: one optimizer step (or gradient) over a whole batch.

:func:`value_and_grad` and :func:`value_and_update` each build one
:class:`accum_jax._loop.LoopSpec` and run it with :func:`runner`: on one device the
plain loop (:func:`accum_jax._loop.scan`), on a mesh whose batch axes shard
the batch the same loop per device, reduced once after it
(:func:`accum_jax._sharding.scan`). :func:`optimizer_step` is the body of
:func:`value_and_update`, shared with the Flax helpers.
"""

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from accum_jax import (
  _accumulate,
  _checks,
  _loop,
  _nonfinite,
  _options,
  _sharding,
  _split,
)

INNER_EXTRA_ARGS_KWARG = 'inner_extra_args'


def runner(loop: _loop.LoopSpec, inp: _loop.Inputs
           ) -> Callable[[_loop.LoopSpec, _loop.Inputs, Any], _loop.Result]:
  """What runs ``loop`` on ``inp``, called as ``runner(loop, inp)(loop, inp,
  start)``: the plain loop here (:func:`accum_jax._loop.scan`), or the loop
  split over the mesh that shards the batch (:func:`accum_jax._sharding.scan`
  with its plan). ``start`` is the gradient sum of a window left part-full.
  Returned rather than called, so the loop is one frame from its caller."""
  options = loop.options
  if any(loop.batch_args.axes):
    _check_not_split(loop, inp.batch)
    return _loop.scan
  plan = _sharding.plan(options.mesh, options.axis_name, options.fsdp_reduce,
                        inp.params, inp.batch, loop.num_microbatches,
                        options.param_specs)
  if plan is None:
    return _loop.scan
  if loop.should_skip_update_fn is not None:
    raise ValueError(
        'should_skip_update_fn is asked for each micro-batch\'s gradient, but '
        'on this mesh every device holds only its share of a micro-batch '
        'until the one reduction after the loop. Use nonfinite='
        "'skip_microbatch' (screened per device share) in-step, or the "
        'predicate cross-step (tx.update on the reduced gradient).'
    )
  if (options.per_example_fn is not None
      and plan.fsdp_reduce == 'per_microbatch'
      and any(len(s) for s in jax.tree.leaves(plan.param_specs))):
    raise ValueError(
        'per_example_fn with parameters sharded over the batch axes '
        f"{plan.axes} needs fsdp_reduce='per_step': with 'per_microbatch' "
        'each gradient is reduce-scattered inside the differentiated function,'
        ' summing different devices\' examples before the transform sees them.'
    )
  return functools.partial(_sharding.scan, plan)


def _check_not_split(loop: _loop.LoopSpec, batch: Any) -> None:
  """A batch axis other than the leading one is split on this device only."""
  axes = loop.batch_args.tree_axes
  sharded = []

  def check(x, axis):
    try:
      sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
      return x
    spec = getattr(sharding, 'spec', None)
    if spec is not None and len(spec) > axis % jnp.ndim(x) and spec[
        axis % jnp.ndim(x)] is not None:
      sharded.append(spec)
    return x

  _split.map_axes(check, axes, batch)
  if (sharded or loop.options.mesh is not None
      or loop.options.axis_name is not None):
    raise ValueError(
        f'in_axes={loop.batch_args.axes}: a batch axis other than the leading '
        'one is split on one device only, not over a mesh (mesh=, axis_name= '
        f'or a batch sharded along it{": " + str(sharded[0]) if sharded else ""}'
        '). Put the batch axis first for the mesh (e.g. jnp.swapaxes in the '
        'data pipeline) and pass in_axes=0.'
    )


def value_and_grad(
    loss_fn: Callable[..., Any],
    num_microbatches: int,
    *,
    argnums: int = 0,
    accumulator_dtype: Any | None = jnp.float32,
    options: _options.LoopOptions | None = None,
    **loop_options: Any,
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
    arguments are passed unchanged to every micro-batch. As in
    ``optax.microbatching.microbatch``, ``batch_argnums`` /
    ``batch_argnames`` name other (or more) batched arguments and
    ``in_axes`` their batch axes, e.g. ``in_axes=1`` for sequence-first
    ``(T, B, ...)`` data; each is split the same copy-free way along its
    axis. ``weight_fn`` then takes the micro-batch of each, positional ones
    first.
  * **Per-example transform.** With ``per_example_fn`` (optax
    ``micro_grad``'s ``transform_fn``), each example's gradient (``loss_fn``
    on a batch of that one row) is computed by ``jax.vmap`` inside its
    micro-batch and transformed, e.g. clipped to a norm for DP-SGD; a
    micro-batch's gradient is the mean of its transformed ones, its loss the
    mean of its examples' losses, its aux reduced over them like the loss.
    Only one micro-batch's per-example gradients are in memory. ``rng`` is
    further folded with the example's index in the micro-batch.
  * **Weighting.** The result is :math:`\sum_j w_j L_j / \sum_j w_j` and its
    gradient, where :math:`L_j` is ``loss_fn`` on micro-batch ``j`` and
    :math:`w_j` is ``weight_fn(microbatch_j)`` (default 1). With a mean loss
    and no ``weight_fn`` this is the full-batch mean. For a token-mean loss
    over padded sequences, let ``loss_fn`` return the mean over the
    micro-batch's real tokens and ``weight_fn`` the count of real tokens: the
    result is then exactly the full-batch token mean, whatever the padding per
    micro-batch. A batch whose weights sum to 0 gives 0 and zero gradients.
  * **Aux.** Floating aux leaves are weighted means like the loss, integer
    leaves are summed (counts), boolean leaves are OR-ed. A floating leaf
    that is a sum over the batch's rows or tokens (a token-loss sum, a count
    as a float) is summed over the micro-batches instead with ``aux='sum'``
    (every leaf) or a pytree prefix of ``'mean'`` and ``'sum'``, e.g.
    ``aux={'lm_loss_sum': 'sum', 'accuracy': 'mean'}``; a micro-batch of
    weight 0 (padding, dropped as non-finite) adds nothing to a sum. With
    ``aux='stack'`` the aux leaves are returned stacked instead, with a
    leading axis of size ``k`` (:func:`concat_microbatches` puts per-row
    leaves back in row order). With ``aux='concat'`` every aux leaf holds
    one entry per row (logits, per-example losses) and is returned for the
    whole batch in the batch's row order, ``(B, ...)``, written in place in
    one output buffer (optax's ``AccumulationType.CONCAT``); its row axis is
    the batch axis (``in_axes``) when all batched arguments share one, else
    0. Rows of padding micro-batches, or of micro-batches dropped as
    non-finite, are zeros.
  * **RNG.** A PRNG key (or a pytree of keys) passed as the keyword ``rng=``
    reaches micro-batch ``j`` as ``jax.random.fold_in(rng, j)``, so every
    micro-batch gets its own dropout mask; so does a new-style key
    (``jax.random.key``) under any other name or in an unbatched argument.
    On a mesh each device first folds in its index.
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
    argnums: the position of the differentiated argument in ``loss_fn``'s
      arguments, as ``jax.value_and_grad``'s (one int; pack several into a
      pytree). ``f`` then takes ``loss_fn``'s arguments in ``loss_fn``'s
      order, and ``batch_argnums`` (required when ``argnums`` is not 0,
      unless ``batch_argnames`` are given) are positions in them too.
    accumulator_dtype: see above; ``None`` sums in the gradients' dtype.
    options: the loop's options as one :class:`LoopOptions` (by default
      its defaults).
    **loop_options: any field of :class:`LoopOptions`, replacing that field
      of ``options``: ``has_aux``, ``weight_fn``, ``aux``, ``remat``,
      ``unroll``, ``per_example_fn``, ``batch_argnums``, ``batch_argnames``,
      ``in_axes``, ``mesh``, ``axis_name``, ``fsdp_reduce``,
      ``param_specs``. ``stack_aux=True`` and ``concat_aux=True`` still
      work as ``aux='stack'`` and ``aux='concat'``, with a
      ``DeprecationWarning``.

  Returns:
    ``f(params, batch, *args, **kwargs)`` (with ``argnums``, ``loss_fn``'s
    own arguments) returning ``(value, grads)`` or ``((value, aux),
    grads)``.

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

    Sequence-first data split over two arguments, with each example's
    gradient clipped to norm 1 (DP-SGD without the noise):

    >>> def loss_fn(w, x, y):  # x: (T, B, 2), y: (B,)
    ...   return jnp.mean((x.sum(0) @ w - y) ** 2)
    >>> x, y = jnp.ones((3, 8, 2)), jnp.arange(8.0)
    >>> clip = lambda g: g / jnp.maximum(1.0, jnp.linalg.norm(g))
    >>> f = accum_jax.value_and_grad(loss_fn, 4, batch_argnums=(1, 2),
    ...                              in_axes=(1, 0), per_example_fn=clip)
    >>> loss, grads = f(w, x, y)
    >>> per_example = jax.vmap(jax.grad(loss_fn), (None, 1, 0))(
    ...     w, x[:, :, None], y[:, None])
    >>> bool(jnp.allclose(grads, jax.vmap(clip)(per_example).mean(0)))
    True
  """
  position = argnums
  options = _options.make(options, who='value_and_grad', **loop_options)
  loss_fn, batch_argnums = _split.params_first(
      loss_fn, argnums, options.batch_argnums, options.batch_argnames)
  loop = _loop.LoopSpec(
      loss_fn, _checks.check_num_microbatches(num_microbatches), options,
      _split.BatchArgs.make(batch_argnums, options.batch_argnames,
                            options.in_axes),
      accumulator_dtype=accumulator_dtype)

  def f(*args, **kwargs):
    if len(args) <= position:
      raise TypeError(
          f'argnums={position} but the micro-batched value_and_grad got '
          f'{len(args)} positional arguments.')
    params, args = args[position], args[:position] + args[position + 1:]
    inp = _loop.call_inputs(loop, params, args, kwargs)
    result = runner(loop, inp)(loop, inp, None)
    grads = result.mean_grads()
    return result.sums.finish(result.shapes, options.has_aux), grads

  return f


def value_and_update(
    loss_fn: Callable[..., Any],
    tx: _accumulate.AccumulateTransformation,
    *,
    argnums: int = 0,
    options: _options.LoopOptions | None = None,
    **loop_options: Any,
) -> Callable[..., Any]:
  """One optimizer step over a whole batch, micro-batched in one ``lax.scan``.

  ``value_and_update(loss_fn, tx)(params, opt_state, batch, *args, **kwargs)``
  returns ``(value, updates, opt_state)``. ``tx`` is an :func:`accumulate`
  transform; its accumulator and weight sum are the scan's carry, over its
  ``num_microbatches`` micro-batches, and its inner optimizer is applied
  **once**, after the loop. One call is one optimizer step: the inner step
  count and any schedule advance by exactly one, and ``opt_state`` comes back
  at a window boundary (``count == 0``).

  The split (and which arguments are batched), per-example transform,
  weighting, aux, RNG, dtype, mesh and ``num_real_microbatches=``
  rules are those of :func:`value_and_grad`; ``tx``'s ``nonfinite`` policy is
  applied to every micro-batch (its gradient, weight and loss), and so is its
  ``should_skip_update_fn`` (one device only). Call it on a state at a window
  boundary, which is where it always leaves it; a window left half-full by
  cross-step ``tx.update`` calls is folded into this step's mean.

  **Extra arguments of the inner optimizer.** When the inner optimizer's
  ``update`` takes ``value`` (or ``**extra_args``, as ``optax.chain`` and
  every optax ``GradientTransformationExtraArgs`` do) it gets ``value=`` the
  batch's loss (the weighted mean that is returned), as
  ``optax.contrib.reduce_on_plateau`` and the line searches expect. The
  keyword ``inner_extra_args=`` (a dict, taken out of ``**kwargs``) adds or
  overrides extra arguments, e.g. ``inner_extra_args={'value': val_loss}``.

  Args:
    loss_fn: ``loss_fn(params, batch, *args, **kwargs)`` returning a scalar
      loss, or ``(loss, aux)`` with ``has_aux=True``.
    tx: a transform made by :func:`accumulate`.
    argnums: the position of the params in ``loss_fn``'s arguments (as in
      :func:`value_and_grad`); ``f`` still takes the params first, then
      ``opt_state``, then ``loss_fn``'s other arguments in their order, and
      ``batch_argnums`` are positions in ``loss_fn``'s own arguments.
    options: as in :func:`value_and_grad`.
    **loop_options: as in :func:`value_and_grad`.

  Returns:
    ``f(params, opt_state, batch, *args, **kwargs)`` returning ``(value,
    updates, opt_state)``, where ``value`` is ``loss`` or ``(loss, aux)``
    (``f(params, opt_state, *args, **kwargs)``, ``loss_fn``'s arguments
    other than params, with ``batch_argnums`` or ``argnums``).

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
  options = _options.make(options, who='value_and_update', **loop_options)
  loss_fn, batch_argnums = _split.params_first(
      loss_fn, argnums, options.batch_argnums, options.batch_argnames)
  loop = for_transform(
      tx, loss_fn, 'value_and_update', options,
      batch_args=_split.BatchArgs.make(batch_argnums, options.batch_argnames,
                                       options.in_axes))

  def f(params, opt_state, *args, **kwargs):
    extra_args = None
    if INNER_EXTRA_ARGS_KWARG in kwargs:
      kwargs = dict(kwargs)
      extra_args = kwargs.pop(INNER_EXTRA_ARGS_KWARG)
      if not isinstance(extra_args, Mapping):
        raise TypeError(
            f'{INNER_EXTRA_ARGS_KWARG} must be a dict of keyword arguments '
            f'for the inner optimizer, got {type(extra_args).__name__}.'
        )
    # optax.lookahead: the loss sees the fast params, the inner optimizer
    # both (LookaheadParams).
    value, updates, opt_state, _ = optimizer_step(
        loop, tx, _loop.call_inputs(loop, _accumulate.differentiated(params),
                                    args, kwargs), opt_state, extra_args,
        inner_params=params)
    return value, updates, opt_state

  return f


def for_transform(tx: _accumulate.AccumulateTransformation,
                  loss_fn: Callable[..., Any], who: str,
                  options: _options.LoopOptions = _options.DEFAULT,
                  **fields: Any) -> _loop.LoopSpec:
  """The :class:`accum_jax._loop.LoopSpec` of an ``accumulate`` transform's
  step: its ``k``, accumulator dtype, non-finite policy, skip predicate and
  noise tally, with ``options`` and the other spec ``fields``."""
  config = tx.config
  return _loop.LoopSpec(loss_fn, config.static_num_microbatches(who), options,
                        accumulator_dtype=config.accumulator_dtype,
                        nonfinite=config.nonfinite,
                        should_skip_update_fn=config.should_skip_update_fn,
                        track_noise_scale=config.track_noise_scale, **fields)


def takes_value(update: Callable[..., Any]) -> bool:
  """Whether an optax ``update`` accepts the keyword ``value``."""
  try:
    parameters = inspect.signature(update).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind is p.VAR_KEYWORD or (
      p.name == 'value' and p.kind is not p.POSITIONAL_ONLY)
             for p in parameters)


def optimizer_step(loop: _loop.LoopSpec, tx: Any, inp: _loop.Inputs,
                   opt_state: Any,
                   extra_args: Mapping[str, Any] | None = None,
                   inner_params: Any = None,
                   ) -> tuple[Any, Any, Any, Any]:
  """One optimizer step over ``inp.batch``: ``(value, updates, opt_state,
  state)``, with ``state`` the threaded state after the last micro-batch.
  ``inner_params`` are the params the optimizer gets, where they hold more
  than the differentiated ``inp.params`` (``optax.LookaheadParams``).

  With an ``accumulate`` ``tx`` its accumulator is the loop's carry and its
  inner optimizer runs once, after the loop, with ``value=`` the batch's loss
  when it takes it, and ``extra_args``; with a plain optimizer the mean
  gradient is formed in a fresh accumulator and ``tx.update`` applied once.
  """
  if inner_params is None:
    inner_params = inp.params
  has_aux = loop.options.has_aux
  if not isinstance(tx, _accumulate.AccumulateTransformation):
    result = runner(loop, inp)(loop, inp, None)
    grads = result.mean_grads()
    updates, opt_state = tx.update(grads, opt_state, inner_params)
    return (result.sums.finish(result.shapes, has_aux), updates,
            opt_state, result.state)
  if not isinstance(opt_state, _accumulate.AccumulateState):
    raise TypeError(
        'value_and_update expects the AccumulateState made by tx.init, got '
        f'{type(opt_state).__name__}.'
    )
  tx.config.check_state(opt_state, inner_params, 'value_and_update')
  if loop.should_skip_update_fn is not None:
    inp = inp._replace(gradient_step=opt_state.step,
                       skip_state=opt_state.skip_state)
  result = runner(loop, inp)(
      loop, inp, opt_state.acc if tx.config.cross_step else None)
  sums = result.sums
  noise = opt_state.noise
  if sums.noise is not None:
    noise = noise._replace(window=noise.window + sums.noise)
  summed = _nonfinite.count_bad(
      opt_state._replace(acc=sums.grads, weight=opt_state.weight + sums.weight,
                         noise=noise),
      sums.bad)
  if loop.should_skip_update_fn is not None:
    summed = summed._replace(skip_state=sums.skip_info)
  value = sums.finish(result.shapes, has_aux)
  inner_args = {}
  if takes_value(tx.config.inner.update):
    inner_args['value'] = value[0] if has_aux else value
  inner_args.update(extra_args or {})
  # With unit weights, all micro-batches real and nothing skipped, the
  # window's weight is >= k > 0: no empty-window guard (it costs memory).
  guard = loop.screened or inp.num_real is not None
  updates, opt_state = tx.config.finish_window(
      summed, result.shapes.grads, inner_params, inner_args, guard=guard,
      check_sum=loop.sum_check)
  return value, updates, opt_state, result.state
