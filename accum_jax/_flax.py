"""Flax integration: one accumulated optimizer step for Linen and NNX models.

:func:`linen_train_step` takes a ``flax.training.train_state.TrainState`` (or
a subclass with ``batch_stats``) and :func:`nnx_train_step` an NNX model and
its ``nnx.Optimizer``. Both build one ``_loop.Loop`` and run
``_scan.optimizer_step`` (the body of :func:`accum_jax.value_and_update`),
for an ``accumulate`` optimizer or a plain one. So the split, token weighting,
RNG folding, dtype and non-finite rules of the core apply, and the model's
mutable state (BatchNorm statistics, NNX RNG streams) is threaded through the
micro-batches in order as the scan's extra carry.

Flax is imported only when these names are first used (``accum_jax`` itself
depends on jax and optax only).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

try:
  from flax import nnx
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      'accum_jax.linen_train_step and accum_jax.nnx_train_step need Flax: '
      'pip install flax (or accum_jax[examples]).'
  ) from e

from accum_jax import _accumulate, _checks, _loop, _scan


def _loop_for(tx: Any, opt_state: Any, loss_fn: Callable[..., Any],
              num_microbatches: int | None, where: str, who: str,
              **options: Any) -> Any:
  """The loop of one step: ``k`` from an accumulate ``tx``, or given for a
  plain one (which must not hide an accumulate)."""
  nested = (None if isinstance(tx, _accumulate.AccumulateTransformation)
            else _accumulate.nested_error(opt_state, who))
  if nested is not None:
    if num_microbatches is not None:
      raise TypeError(
          f'{who}: num_microbatches={num_microbatches} was given, but '
          f'{where} contains an accum_jax.accumulate, whose window would '
          f'stack on this one. {nested.args[0].split(". ", 2)[-1]}'
      )
    raise nested
  if isinstance(tx, _accumulate.AccumulateTransformation):
    loop = _scan.for_transform(tx, loss_fn, who, **options)
    k = loop.num_microbatches
    if num_microbatches is not None and num_microbatches != k:
      raise ValueError(
          f'{where} is accum_jax.accumulate(..., num_microbatches={k}) but '
          f'num_microbatches={num_microbatches} was passed; leave '
          'num_microbatches out (the transform sets it).'
      )
    return loop
  if num_microbatches is None:
    raise TypeError(
        f'{where} is a {type(tx).__name__}, not an accum_jax.accumulate '
        'transform, and no num_microbatches was given. Either build the '
        'optimizer as accum_jax.accumulate(optax.adam(1e-3), '
        'num_microbatches=k) (the memory-lean way: the accumulator lives in '
        'the optimizer state), or pass num_microbatches=k to average the '
        'gradients of k micro-batches and apply this optimizer once.'
    )
  return _loop.Loop(loss_fn, _checks.check_num_microbatches(num_microbatches),
                    **options)


def _check_opt_state(tx: Any, opt_state: Any, where: str) -> None:
  if (isinstance(tx, _accumulate.AccumulateTransformation)
      and not isinstance(opt_state, _accumulate.AccumulateState)):
    raise TypeError(
        f'{where}.opt_state is a {type(opt_state).__name__}, not the '
        f'AccumulateState of {where}.tx (an accumulate transform); create '
        f'it with {where}.tx.init(params), e.g. through '
        'TrainState.create(..., tx=...) or nnx.Optimizer(model, tx, ...), '
        'rather than replacing tx on an existing state.'
    )


def _mutable_names(state: Any, mutable: str | Sequence[str] | None):
  if mutable is None:
    return ('batch_stats',) if hasattr(state, 'batch_stats') else ()
  names = (mutable,) if isinstance(mutable, str) else tuple(mutable)
  missing = [name for name in names if not hasattr(state, name)]
  if missing:
    raise ValueError(
        f'mutable={names!r} names {missing!r}, which '
        f'{type(state).__name__} has no field for. Add the collection as a '
        'field of your TrainState subclass (e.g. `batch_stats: Any`).'
    )
  return names


def linen_train_step(
    state: Any,
    batch: Any,
    loss_fn: Callable[..., Any],
    *,
    rng: Any | None = None,
    mutable: str | Sequence[str] | None = None,
    has_aux: bool = False,
    weight_fn: Callable[[Any], Any] | None = None,
    stack_aux: bool = False,
    remat: Any = None,
    num_microbatches: int | None = None,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
  """One optimizer step of a Linen ``TrainState``, micro-batched in a scan.

  Call it inside your jitted train step. ``batch`` is split into ``k``
  strided micro-batches, ``loss_fn`` is differentiated on each inside one
  ``lax.scan``, and the optimizer is applied **once** to the (weighted) mean
  gradient. One call is one optimizer step: ``state.step`` and the inner
  optimizer's count advance by exactly one, as with ``state.apply_gradients``
  on the full batch, and the loss and gradient are the full-batch ones for a
  mean loss (see :func:`accum_jax.value_and_grad` for weighting, aux and
  dtype rules).

  **The optimizer.** Build the state with ``tx=accum_jax.accumulate(inner,
  k)``: ``k`` is read from it, the accumulator in ``state.opt_state`` is the
  scan's carry, and with ``donate_argnums`` on the state the step needs the
  memory of one micro-batch. A plain optimizer works too if you pass
  ``num_microbatches=k``: the gradients are averaged in a fresh accumulator
  and ``state.tx`` is applied once (one more parameter-sized buffer). Do not
  combine :func:`accum_jax.value_and_grad` (which already averages the ``k``
  micro-batches) with ``state.apply_gradients`` on an ``accumulate`` state:
  each call would then be one micro-step of a ``k``-call window, an
  effective batch of ``k`` batches and one update every ``k`` calls.

  **Loss function.** ``loss_fn(params, microbatch, **kw)`` returns the loss,
  or ``(loss, aux)`` with ``has_aux=True``. With mutable collections (by
  default ``batch_stats`` when ``state`` has that field) it is
  ``loss_fn(params, microbatch, model_state, **kw)`` with ``model_state =
  {'batch_stats': ...}`` and returns ``(out, new_model_state)``, where
  ``new_model_state`` is what ``apply(..., mutable=list(model_state))``
  returns. ``kw`` is ``rng=`` when ``rng`` is given.

  **BatchNorm.** The statistics are threaded through the micro-batches in
  order: micro-batch ``j`` normalises with its own batch statistics and
  updates the running averages left by micro-batch ``j-1``, exactly as ``k``
  sequential small forward passes would (a micro-batch dropped by the
  ``nonfinite`` policy of ``accumulate`` leaves them unchanged). This is not
  the full-batch statistic: BatchNorm over a micro-batch of ``B/k`` rows normalises with
  that micro-batch's mean and variance, so the loss and gradient differ from
  the full batch's (the same happens on ``k`` devices without cross-device
  BatchNorm).

  **Dropout.** ``rng`` reaches micro-batch ``j`` as
  ``jax.random.fold_in(rng, j)``: each micro-batch gets its own masks. Fold
  the step into ``rng`` yourself (e.g. ``fold_in(key, state.step)``) so
  steps differ too.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or subclass).
    batch: a pytree whose leaves share a leading batch axis, a multiple of
      ``k``.
    loss_fn: see above.
    rng: an optional PRNG key, passed as ``rng=`` folded per micro-batch.
    mutable: names of the ``state`` fields holding mutable collections to
      thread through the micro-batches; default ``('batch_stats',)`` if
      ``state`` has that field, else none. ``()`` turns it off.
    has_aux: whether the loss function returns ``(loss, aux)``.
    weight_fn: ``weight_fn(microbatch) -> scalar`` weight (e.g. the count of
      real tokens with a token-mean loss).
    stack_aux: return the aux of each micro-batch stacked, not reduced.
    remat: ``None``, ``True`` or a ``jax.checkpoint_policies`` policy for the
      per-micro-batch loss.
    num_microbatches: ``k`` for a plain (non-accumulate) ``state.tx``.
    unroll: micro-batches per loop iteration, as in
      :func:`accum_jax.value_and_grad` (XLA:CPU with convolutions).

  Returns:
    ``(new_state, value)``: the state after one optimizer step (params,
    opt_state, step and mutable collections replaced), and the loss, or
    ``(loss, aux)``, of the whole batch.

  Raises:
    TypeError: ``state.tx`` is not an accumulate transform and no
      ``num_microbatches`` is given, or ``loss_fn`` returns the wrong
      structure.
    ValueError: the batch size is not a multiple of ``k``, or ``mutable``
      names a missing field.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> from flax.training import train_state
    >>> import accum_jax
    >>> model = nn.Dense(1)
    >>> x = jnp.arange(16.0).reshape(8, 2) / 16
    >>> batch = {'x': x, 'y': x @ jnp.array([1.0, -1.0])}
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=accum_jax.accumulate(optax.sgd(0.1), num_microbatches=4))
    >>> def loss_fn(params, mb):
    ...   pred = model.apply({'params': params}, mb['x'])[:, 0]
    ...   return jnp.mean((pred - mb['y']) ** 2)
    >>> step = jax.jit(lambda s, b: accum_jax.linen_train_step(s, b, loss_fn))
    >>> new_state, loss = step(state, batch)
    >>> int(new_state.step), int(new_state.opt_state.count)
    (1, 0)
    >>> ref = jax.tree.map(lambda p, g: p - 0.1 * g, params,
    ...                    jax.grad(loss_fn)(params, batch))
    >>> bool(jnp.allclose(new_state.params['kernel'], ref['kernel']))
    True
  """
  tx = state.tx
  names = _mutable_names(state, mutable)
  loop = _loop_for(tx, state.opt_state, loss_fn, num_microbatches,
                   'state.tx',
                   'linen_train_step', has_aux=has_aux, weight_fn=weight_fn,
                   stack_aux=stack_aux, remat=remat, has_state=bool(names),
                   unroll=unroll)
  _check_opt_state(tx, state.opt_state, 'state')
  model_state = ({name: getattr(state, name) for name in names} if names
                 else None)
  kwargs = {} if rng is None else {_loop.RNG_KWARG: rng}
  value, updates, opt_state, new_carry = _scan.optimizer_step(
      loop, tx, _loop.inputs(loop, state.params, batch, (), kwargs,
                             model_state), state.opt_state)
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      **(new_carry if names else {}),
  )
  return new_state, value


def nnx_train_step(
    model: Any,
    optimizer: Any,
    batch: Any,
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    weight_fn: Callable[[Any], Any] | None = None,
    stack_aux: bool = False,
    remat: Any = None,
    num_microbatches: int | None = None,
    unroll: int | bool = 1,
) -> Any:
  """One optimizer step of an NNX model, micro-batched in a scan.

  The NNX counterpart of :func:`linen_train_step`: call it inside
  ``nnx.jit``. ``loss_fn(model, microbatch)`` returns the loss, or ``(loss,
  aux)`` with ``has_aux=True``, like the function you would give
  ``nnx.value_and_grad``. The model is split into the variables
  ``optimizer`` trains (its ``wrt`` filter, e.g. ``nnx.Param``), which are
  differentiated, and everything else (BatchNorm statistics, RNG stream
  counters, other variables), which is threaded through the micro-batches in
  order: micro-batch ``j`` sees the state left by micro-batch ``j-1``. So
  ``nnx.Dropout`` draws a fresh mask per micro-batch from its advancing
  stream, and BatchNorm behaves as ``k`` sequential small forward passes (not
  the full-batch statistic; see :func:`linen_train_step`).

  ``model`` and ``optimizer`` are updated in place, as
  ``optimizer.update(model, grads)`` does. One call is one optimizer step:
  ``optimizer.step`` and the inner optimizer's count advance by one.

  ``optimizer.tx`` should be :func:`accum_jax.accumulate` (``k`` read from
  it; its accumulator is the scan's carry). A plain optax optimizer works
  with ``num_microbatches=k``. For cross-step accumulation (one jitted call
  per micro-batch) no helper is needed: ``nnx.Optimizer(model,
  accum_jax.accumulate(inner, k), wrt=nnx.Param)`` and
  ``optimizer.update(model, grads)`` per micro-batch apply ``inner`` every
  ``k``-th call (``optimizer.step`` then counts micro-steps; pass
  ``weight=`` to ``update`` for token weighting).

  Args:
    model: an ``nnx.Module``.
    optimizer: an ``nnx.Optimizer`` built for ``model``.
    batch: a pytree whose leaves share a leading batch axis, a multiple of
      ``k``.
    loss_fn: ``loss_fn(model, microbatch)``, see above.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    weight_fn: ``weight_fn(microbatch) -> scalar`` weight of a micro-batch.
    stack_aux: return the aux of each micro-batch stacked, not reduced.
    remat: ``None``, ``True`` or a ``jax.checkpoint_policies`` policy.
    num_microbatches: ``k`` for a plain (non-accumulate) ``optimizer.tx``.
    unroll: micro-batches per loop iteration, as in
      :func:`accum_jax.value_and_grad` (XLA:CPU with convolutions).

  Returns:
    The loss, or ``(loss, aux)``, of the whole batch.

  Raises:
    TypeError: ``optimizer`` is not an ``nnx.Optimizer``, its ``tx`` is not
      an accumulate transform and no ``num_microbatches`` is given, or
      ``loss_fn`` returns the wrong structure.
    ValueError: the batch size is not a multiple of ``k``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import accum_jax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = accum_jax.accumulate(optax.sgd(0.1), num_microbatches=4)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> x = jnp.arange(16.0).reshape(8, 2) / 16
    >>> batch = {'x': x, 'y': x @ jnp.array([[1.0], [-1.0]])}
    >>> def loss_fn(model, mb):
    ...   return jnp.mean((model(mb['x']) - mb['y']) ** 2)
    >>> @nnx.jit
    ... def step(model, optimizer, batch):
    ...   return accum_jax.nnx_train_step(model, optimizer, batch, loss_fn)
    >>> ref = nnx.grad(loss_fn)(model, batch)['kernel'][...]
    >>> expected = model.kernel[...] - 0.1 * ref
    >>> loss = step(model, optimizer, batch)
    >>> int(optimizer.step[...])
    1
    >>> bool(jnp.allclose(model.kernel[...], expected))
    True
  """
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        'nnx_train_step expects an nnx.Optimizer, e.g. nnx.Optimizer(model, '
        'accum_jax.accumulate(optax.adam(1e-3), k), wrt=nnx.Param); got '
        f'{type(optimizer).__name__}.'
    )
  tx = optimizer.tx
  wrt = optimizer.wrt
  graph = getattr(optimizer, 'graph', None)
  graphdef, params, rest = nnx.split(model, wrt, ..., graph=graph)
  params = nnx.as_pure(params)
  rest = nnx.as_pure(rest)
  # A model with nothing but trained variables needs no carry (the plain,
  # cheapest loop); otherwise the rest is threaded through the micro-batches.
  stateful = bool(jax.tree.leaves(rest))

  def loss(params, microbatch, *state):
    module = nnx.merge(graphdef, params, *(state or (rest,)))
    out = loss_fn(module, microbatch)
    if not stateful:
      return out
    _, _, new_rest = nnx.split(module, wrt, ..., graph=graph)
    return out, nnx.as_pure(new_rest)

  opt_state = nnx.as_pure(optimizer.opt_state)
  loop = _loop_for(tx, opt_state, loss, num_microbatches, 'optimizer.tx',
                   'nnx_train_step', has_aux=has_aux, weight_fn=weight_fn,
                   stack_aux=stack_aux, remat=remat, has_state=stateful,
                   unroll=unroll)
  _check_opt_state(tx, opt_state, 'optimizer')
  value, updates, opt_state, new_rest = _scan.optimizer_step(
      loop, tx, _loop.inputs(loop, params, batch, (), {},
                             rest if stateful else None), opt_state)
  nnx.update(model, optax.apply_updates(params, updates),
             new_rest if stateful else rest)
  nnx.update(optimizer.opt_state, nnx.state(opt_state, graph=graph))
  optimizer.step[...] += 1
  return value
