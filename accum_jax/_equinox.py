"""Equinox integration: micro-batched ``eqx.filter_value_and_grad``.

An Equinox module is a pytree that holds arrays and other leaves (activation
functions, sizes). :func:`filter_value_and_grad` and
:func:`filter_value_and_update` differentiate with respect to its
``eqx.is_inexact_array`` leaves, as ``eqx.filter_value_and_grad`` does, and
treat the rest as static: each call partitions the module, binds the static
part into the loss of the driver's ``_loop.LoopSpec`` and runs the core
(``_scan.runner``, ``_scan.optimizer_step``) on the arrays.

Equinox is imported only when these names are first used (``accum_jax``
itself depends on jax and optax only).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

try:
  import equinox as eqx
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      'accum_jax.filter_value_and_grad and accum_jax.filter_value_and_update '
      'need Equinox: pip install equinox (or accum_jax[equinox]).'
  ) from e

from accum_jax import _accumulate, _checks, _loop, _options, _scan, _split


def _positions(argnums: int | Sequence[int] | None, num_args: int,
               who: str) -> tuple[int, ...]:
  """The positions of the batched arguments, counting the model as 0."""
  if argnums is None:
    positions = tuple(range(1, num_args + 1))
  else:
    single = isinstance(argnums, int) and not isinstance(argnums, bool)
    positions = (argnums,) if single else tuple(argnums)
    if not positions or any(
        isinstance(i, bool) or not isinstance(i, int)
        or not 1 <= i <= num_args for i in positions):
      raise ValueError(
          f'{who}: batch_argnums={argnums!r} must name the batched positional '
          f'arguments of loss_fn, from 1 to {num_args} with {num_args} '
          'positional argument(s) after the model (the model is 0).'
      )
  if not positions:
    raise ValueError(
        f'{who}: no batch to split. Pass the batch as a positional argument '
        'after the model: f(model, x, y).'
    )
  return tuple(sorted(set(positions)))


def _make(options: _options.LoopOptions | None, given: dict[str, Any],
          who: str) -> _options.LoopOptions:
  """The helpers' options: ``argnums=`` (the batched positions, an older
  spelling) is ``batch_argnums=``; keyword arguments are never batched."""
  given = dict(given)
  _options.renamed(given, 'argnums', 'batch_argnums', who)
  options = _options.make(options, who=who, **given)
  _options.refuse(options, who, ('batch_argnames',),
                  'the batched arguments are positional (batch_argnums).')
  return options


def _batch_args(options: _options.LoopOptions, who: str) -> _split.BatchArgs:
  """The loop's batch: one argument, the tuple of the batched ones, split
  along ``in_axes``."""
  return _split.BatchArgs.make(1, (), _options.one_axis(options, who))


def _bind(loop: _loop.LoopSpec, loss_fn: Callable[..., Any], argnums: Any,
          model: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
          who: str) -> tuple[_loop.LoopSpec, _loop.Inputs]:
  """This call's loop and inputs: the module's inexact arrays are the
  params, the batched arguments the batch; static leaves (of the module and
  of the other arguments) are bound into the loop's loss."""
  positions = _positions(argnums, len(args), who)
  params, static = eqx.partition(model, eqx.is_inexact_array)
  batch = tuple(args[i - 1] for i in positions)
  others = tuple(a for i, a in enumerate(args, 1) if i not in positions)
  inp = _loop.inputs(loop, params, batch, others, kwargs)
  dynamic_args, static_args = eqx.partition(inp.args, eqx.is_array)
  dynamic_kwargs, static_kwargs = eqx.partition(inp.kwargs, eqx.is_array)

  def loss(params, microbatch, *args, **kwargs):
    args = list(eqx.combine(args, static_args))
    for position, part in zip(positions, microbatch, strict=True):
      args.insert(position - 1, part)
    return loss_fn(eqx.combine(params, static), *args,
                   **eqx.combine(kwargs, static_kwargs))

  return (dataclasses.replace(loop, loss_fn=loss),
          inp._replace(args=dynamic_args, kwargs=dynamic_kwargs))


def filter_value_and_grad(
    loss_fn: Callable[..., Any],
    num_microbatches: int,
    *,
    accumulator_dtype: Any | None = jnp.float32,
    options: _options.LoopOptions | None = None,
    **loop_options: Any,
) -> Callable[..., Any]:
  """A micro-batched drop-in for ``eqx.filter_value_and_grad(loss_fn)``.

  ``filter_value_and_grad(loss_fn, k)(model, x, y, **kwargs)`` returns what
  ``eqx.filter_value_and_grad(loss_fn, has_aux=has_aux)(model, x, y,
  **kwargs)`` returns on the full batch, computed one micro-batch at a time in
  a ``lax.scan``: the loss (or ``(loss, aux)``) and the gradient with respect
  to the model's ``eqx.is_inexact_array`` leaves, a pytree like ``model``
  with ``None`` in place of every other leaf.

  The positional arguments after the model are the batch: every one is
  split along its leading axis into ``k`` strided micro-batches (micro-batch
  ``j`` takes rows ``j, j+k, ...``), unless ``argnums`` names the batched ones
  (the others then reach every micro-batch whole). Keyword arguments reach
  every micro-batch unchanged, except PRNG keys (``key=`` as Equinox names
  it, any new-style key, or ``rng=``), which micro-batch ``j`` gets as
  ``jax.random.fold_in(key, j)``, and
  ``num_real_microbatches=``. Non-array leaves of the module and of the
  arguments are static, as in ``eqx.filter_jit``. Weighting, aux, dtype and
  mesh rules are those of :func:`accum_jax.value_and_grad`.

  With a plain optax optimizer this is the whole change to a training step:
  ``optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))`` then
  applies the mean gradient of the ``k`` micro-batches. With
  :func:`accum_jax.accumulate` use :func:`filter_value_and_update`, which
  accumulates into the optimizer state (no separate gradient buffer).

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    num_microbatches: ``k``, the number of micro-batches.
    accumulator_dtype: as in :func:`accum_jax.value_and_grad`.
    options: the loop's options as one :class:`accum_jax.LoopOptions`.
    **loop_options: any field of :class:`accum_jax.LoopOptions`, replacing
      that field of ``options``: ``has_aux``, ``weight_fn`` (it takes the
      tuple of the batched arguments' micro-batches), ``aux``, ``remat``,
      ``unroll``, ``per_example_fn``, ``batch_argnums`` (the positions of
      the batched arguments in ``loss_fn``'s positional arguments, the model
      being 0; by default every positional argument after the model),
      ``in_axes`` (one int for all), ``mesh``, ``axis_name``,
      ``fsdp_reduce``, ``param_specs``. ``argnums=`` and ``stack_aux=True``
      still work as ``batch_argnums=`` and ``aux='stack'``, with a
      ``DeprecationWarning``.

  Returns:
    ``f(model, *args, **kwargs)`` returning ``(value, grads)``.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import accum_jax
    >>> model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
    >>> def loss(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)
    >>> x = jnp.arange(16.0).reshape(8, 2) / 16
    >>> y = x[:, 0] - x[:, 1]
    >>> loss_value, grads = eqx.filter_jit(
    ...     accum_jax.filter_value_and_grad(loss, 4))(model, x, y)
    >>> ref_value, ref_grads = eqx.filter_value_and_grad(loss)(model, x, y)
    >>> bool(jnp.allclose(loss_value, ref_value))
    True
    >>> bool(jnp.allclose(grads.layers[0].weight, ref_grads.layers[0].weight))
    True
    >>> grads.activation is None  # a static leaf, as in Equinox
    True
  """
  who = 'filter_value_and_grad'
  options = _make(options, loop_options, who)
  loop = _loop.LoopSpec(
      loss_fn, _checks.check_num_microbatches(num_microbatches), options,
      _batch_args(options, who), accumulator_dtype=accumulator_dtype)
  argnums = options.batch_argnums

  def f(model, *args, **kwargs):
    bound, inp = _bind(loop, loss_fn, argnums, model, args, kwargs,
                       'filter_value_and_grad')
    result = _scan.runner(bound, inp)(bound, inp, None)
    grads = result.mean_grads()
    return result.sums.finish(result.shapes, options.has_aux), grads

  return f


def filter_value_and_update(
    loss_fn: Callable[..., Any],
    tx: Any,
    *,
    options: _options.LoopOptions | None = None,
    **loop_options: Any,
) -> Callable[..., Any]:
  """One optimizer step of an Equinox model, micro-batched in a scan.

  ``filter_value_and_update(loss_fn, tx)(model, opt_state, x, y)`` returns
  ``(value, updates, opt_state)``: :func:`accum_jax.value_and_update` for a
  module. ``tx`` is an :func:`accum_jax.accumulate` transform and
  ``opt_state`` its state from ``tx.init(eqx.filter(model,
  eqx.is_inexact_array))`` (``eqx.is_array`` gives the same tree when the
  model holds no integer arrays). Its accumulator is the scan's carry and its
  inner optimizer runs once, after the loop: one call is one optimizer step.
  ``updates`` is a pytree like ``model`` with ``None`` at the static leaves;
  apply it with ``eqx.apply_updates(model, updates)``.

  The batch and argument rules are those of :func:`filter_value_and_grad`.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    tx: a transform made by :func:`accum_jax.accumulate`.
    options: as in :func:`filter_value_and_grad`.
    **loop_options: as in :func:`filter_value_and_grad`.

  Returns:
    ``f(model, opt_state, *args, **kwargs)`` returning ``(value, updates,
    opt_state)``.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax
    >>> import accum_jax
    >>> model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
    >>> def loss(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)
    >>> x = jnp.arange(16.0).reshape(8, 2) / 16
    >>> y = x[:, 0] - x[:, 1]
    >>> optim = accum_jax.accumulate(optax.sgd(0.1), num_microbatches=4)
    >>> opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    >>> step = eqx.filter_jit(accum_jax.filter_value_and_update(loss, optim))
    >>> loss_value, updates, opt_state = step(model, opt_state, x, y)
    >>> new_model = eqx.apply_updates(model, updates)
    >>> grads = eqx.filter_grad(loss)(model, x, y)
    >>> bool(jnp.allclose(new_model.layers[0].weight,
    ...                   model.layers[0].weight - 0.1 * grads.layers[0].weight))
    True
  """
  who = 'filter_value_and_update'
  if not isinstance(tx, _accumulate.AccumulateTransformation):

    def refuse(model, opt_state, *args, **kwargs):
      # An accumulate nested in a chain is only visible in its state.
      raise _accumulate.nested_error(opt_state, who) or TypeError(
          f'{who} needs a transform made by accum_jax.accumulate(inner, '
          f'num_microbatches), got {type(tx).__name__}. Wrap your optimizer '
          '(accum_jax.accumulate(optax.adam(1e-3), num_microbatches=8)), or '
          'keep it and use accum_jax.filter_value_and_grad(loss_fn, k) with '
          'your optim.update.'
      )

    return refuse
  options = _make(options, loop_options, who)
  loop = _scan.for_transform(tx, loss_fn, who, options,
                             batch_args=_batch_args(options, who))
  argnums = options.batch_argnums

  def f(model, opt_state, *args, **kwargs):
    bound, inp = _bind(loop, loss_fn, argnums, model, args, kwargs, who)
    value, updates, opt_state, _ = _scan.optimizer_step(bound, tx, inp,
                                                        opt_state)
    return value, updates, opt_state

  return f
