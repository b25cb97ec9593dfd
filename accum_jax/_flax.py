"""Flax integration: one accumulated optimizer step for Linen and NNX models.

:func:`linen_train_step` takes a ``flax.training.train_state.TrainState`` (or
a subclass with ``batch_stats``) and :func:`nnx_train_step` an NNX model and
its ``nnx.Optimizer``. Both build one ``_loop.LoopSpec`` and run
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
  from flax import errors as flax_errors
  from flax import nnx
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      'accum_jax.linen_train_step and accum_jax.nnx_train_step need Flax: '
      'pip install flax (or accum_jax[examples]).'
  ) from e

from accum_jax import _accumulate, _checks, _loop, _options, _scan, _split


def _loop_for(tx: Any, opt_state: Any, loss_fn: Callable[..., Any],
              num_microbatches: int | None, where: str, who: str,
              options: _options.LoopOptions, has_state: bool,
              batch_args: _split.BatchArgs) -> Any:
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
    loop = _scan.for_transform(tx, loss_fn, who, options, has_state=has_state,
                               batch_args=batch_args)
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
  return _loop.LoopSpec(loss_fn,
                        _checks.check_num_microbatches(num_microbatches),
                        options, batch_args, has_state=has_state)


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
    num_microbatches: int | None = None,
    options: _options.LoopOptions | None = None,
    **loop_options: Any,
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
    num_microbatches: ``k`` for a plain (non-accumulate) ``state.tx``.
    options: the loop's options as one :class:`accum_jax.LoopOptions`.
    **loop_options: any field of :class:`accum_jax.LoopOptions`, replacing
      that field of ``options`` (``has_aux``, ``weight_fn``, ``aux``,
      ``remat``, ``unroll``, ``per_example_fn``, ``in_axes`` (one int),
      ``mesh``, ``axis_name``, ``fsdp_reduce``, ``param_specs``). The
      micro-batch is always ``loss_fn``'s second argument, so
      ``batch_argnums`` and ``batch_argnames`` are refused.
      ``stack_aux=True`` still works as ``aux='stack'``, with a
      ``DeprecationWarning``.

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
  who = 'linen_train_step'
  options = _options.make(options, who=who, **loop_options)
  _options.refuse(options, who, ('batch_argnums', 'batch_argnames'),
                  "the micro-batch is loss_fn's second argument (put more "
                  'batched arrays in the batch pytree).')
  loop = _loop_for(tx, state.opt_state, loss_fn, num_microbatches,
                   'state.tx', who, options, bool(names),
                   _split.BatchArgs.make(1, (), _options.one_axis(options,
                                                                  who)))
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


def _is_node(x: Any) -> bool:
  return nnx.graph.is_graph_node(x)


def _take_nodes(args: tuple[Any, ...], kwargs: dict[str, Any]):
  """The NNX objects (``nnx.Rngs``, modules, variables) among ``loss_fn``'s
  extra arguments, and the arguments with ``None`` in their place."""
  leaves, treedef = jax.tree.flatten(
      (args, kwargs), is_leaf=lambda x: x is None or _is_node(x))
  at = tuple(i for i, leaf in enumerate(leaves) if _is_node(leaf))
  nodes = tuple(leaves[i] for i in at)
  plain = [None if i in at else leaf for i, leaf in enumerate(leaves)]
  args, kwargs = jax.tree.unflatten(treedef, plain)
  return nodes, at, args, kwargs


def _put_nodes(args, kwargs, nodes, at):
  """The inverse of :func:`_take_nodes`: the nodes back in their places."""
  leaves, treedef = jax.tree.flatten((args, kwargs),
                                     is_leaf=lambda x: x is None)
  for i, node in zip(at, nodes, strict=True):
    leaves[i] = node
  return jax.tree.unflatten(treedef, leaves)


def _check_batch_argnum(batch_argnum: Any, num_args: int,
                        batch: Any = None) -> Any:
  if isinstance(batch_argnum, tuple):
    count = num_args + len(batch_argnum)
    if (not batch_argnum or len(set(batch_argnum)) != len(batch_argnum)
        or any(isinstance(p, bool) or not isinstance(p, int)
               or not 1 <= p <= count for p in batch_argnum)):
      raise ValueError(
          f'batch_argnums={batch_argnum!r}: the positions of the batched '
          'arguments among loss_fn\'s positional arguments (the model is 0) '
          f'must be distinct ints from 1 to {count} with {num_args} extra '
          'positional argument(s).')
    if not isinstance(batch, tuple) or len(batch) != len(batch_argnum):
      raise ValueError(
          f'batch_argnums={batch_argnum!r} names {len(batch_argnum)} batched '
          'arguments: pass the batch as a tuple of that many, in the same '
          f'order (got a {type(batch).__name__}).')
    return batch_argnum
  if (isinstance(batch_argnum, bool) or not isinstance(batch_argnum, int)
      or not 1 <= batch_argnum <= num_args + 1):
    raise ValueError(
        f'batch_argnums={batch_argnum!r}: the position of the micro-batch '
        'among loss_fn\'s positional arguments (the model is 0) must be an '
        f'int from 1 to {num_args + 1} with {num_args} extra positional '
        'argument(s), or a tuple of positions with a tuple batch.'
    )
  return batch_argnum


def _insert_batch(extra: list, microbatch: Any, batch_argnum: Any) -> list:
  """``loss_fn``'s positional arguments after the model: ``extra`` with
  the micro-batch (or, for a tuple ``batch_argnum``, each of its parts) in
  its place."""
  if not isinstance(batch_argnum, tuple):
    extra.insert(batch_argnum - 1, microbatch)
    return extra
  for position, part in sorted(zip(batch_argnum, microbatch),
                               key=lambda pair: pair[0]):
    extra.insert(position - 1, part)
  return extra


def nnx_train_step(
    model: Any,
    optimizer: Any,
    batch: Any,
    loss_fn: Callable[..., Any],
    *args: Any,
    num_microbatches: int | None = None,
    options: _options.LoopOptions | None = None,
    **kwargs: Any,
) -> Any:
  """One optimizer step of an NNX model, micro-batched in a scan.

  The NNX counterpart of :func:`linen_train_step`: call it inside
  ``nnx.jit``. ``loss_fn(model, microbatch, *args, **kwargs)`` returns the
  loss, or ``(loss, aux)`` with ``has_aux=True``, like the function you would
  give ``nnx.value_and_grad``. The model is split into the variables
  ``optimizer`` trains (its ``wrt`` filter, e.g. ``nnx.Param``), which are
  differentiated, and everything else (BatchNorm statistics, RNG stream
  counters, other variables), which is threaded through the micro-batches in
  order: micro-batch ``j`` sees the state left by micro-batch ``j-1``. So
  ``nnx.Dropout`` draws a fresh mask per micro-batch from its advancing
  stream, and BatchNorm behaves as ``k`` sequential small forward passes (not
  the full-batch statistic; see :func:`linen_train_step`).

  **Extra arguments.** ``*args`` and the keyword arguments that are not
  loop options reach every micro-batch's ``loss_fn`` unchanged, as
  ``nnx.value_and_grad(loss_fn)(model, batch, *args, **kwargs)`` would pass
  them. With ``options=accum_jax.LoopOptions(...)`` every keyword but
  ``num_microbatches`` reaches ``loss_fn``, whatever its name (a loss
  keyword named ``remat``, say); without it, a keyword that names a loop
  option and also a parameter of ``loss_fn`` is refused as ambiguous.
  ``batch_argnums`` says where the micro-batch goes among ``loss_fn``'s
  positional arguments (the model is 0): the NNX MNIST tutorial's
  ``loss_fn(model, rngs, batch)`` is called with ``batch_argnums=2`` and
  ``rngs`` in ``args``. Several batched arguments, as the Flax cookbook's
  ``loss_fn(model, x, y)``: pass ``batch=(x, y)`` with
  ``batch_argnums=(1, 2)``, each split along its leading axis and put in
  its place. NNX objects among the arguments (an ``nnx.Rngs``,
  another module) are threaded like the model's own state: micro-batch ``j``
  draws from the streams where micro-batch ``j-1`` left them (different keys
  for every micro-batch), and the ``nnx.Rngs`` you passed comes back advanced
  as if the ``k`` micro-batches had run one after the other. They are not
  differentiated. A plain PRNG key passed as ``rng=`` is folded per
  micro-batch, as in :func:`accum_jax.value_and_grad`.

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
    loss_fn: ``loss_fn(model, microbatch, *args, **kwargs)``, see above.
    *args: extra positional arguments of ``loss_fn``.
    num_microbatches: ``k`` for a plain (non-accumulate) ``optimizer.tx``.
    options: the loop's options as one :class:`accum_jax.LoopOptions`; then
      every keyword in ``kwargs`` reaches ``loss_fn``.
    **kwargs: extra keyword arguments of ``loss_fn``; without ``options``,
      also the fields of :class:`accum_jax.LoopOptions` (``has_aux``,
      ``weight_fn``, ``aux``, ``remat``, ``unroll``, ``per_example_fn``,
      ``batch_argnums`` (default 1: the position of the micro-batch among
      ``loss_fn``'s positional arguments, the model being 0; or a tuple of
      positions, one per part of a tuple ``batch``), ``in_axes`` (one int),
      ``mesh``, ``axis_name``, ``fsdp_reduce``, ``param_specs``).
      ``batch_argnum=`` and ``stack_aux=True`` still work as
      ``batch_argnums=`` and ``aux='stack'``, with a ``DeprecationWarning``.

  Returns:
    The loss, or ``(loss, aux)``, of the whole batch.

  Raises:
    ImportError: flax is older than 0.12.7 (:func:`linen_train_step` works
      from flax 0.11.0).
    TypeError: ``optimizer`` is not an ``nnx.Optimizer``, its ``tx`` is not
      an accumulate transform and no ``num_microbatches`` is given, a
      keyword names both a loop option and a parameter of ``loss_fn``, or
      ``loss_fn`` returns the wrong structure.
    ValueError: the batch size is not a multiple of ``k``, or
      ``batch_argnums`` is out of range.

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

    With an ``nnx.Rngs`` argument (here for dropout), each micro-batch draws
    its own keys and the stream advances once per micro-batch:

    >>> drop = nnx.Dropout(0.5)
    >>> def noisy_loss(model, rngs, mb):
    ...   return jnp.mean((drop(model(mb['x']), rngs=rngs) - mb['y']) ** 2)
    >>> rngs = nnx.Rngs(dropout=1)
    >>> loss = nnx.jit(lambda m, o, r, b: accum_jax.nnx_train_step(
    ...     m, o, b, noisy_loss, r, batch_argnums=2))(model, optimizer, rngs,
    ...                                               batch)
    >>> int(rngs.dropout.count[...])
    4
  """
  if not hasattr(nnx, 'as_pure'):
    # Older NNX fails below with an unrelated message (nnx.split's graph=).
    import flax
    raise ImportError(
        'accum_jax.nnx_train_step needs flax >= 0.12.7 (nnx.as_pure); this '
        f'flax is {flax.__version__}: pip install "flax>=0.12.7" (which needs '
        'jax >= 0.10.0), or use linen_train_step.')
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        'nnx_train_step expects an nnx.Optimizer, e.g. nnx.Optimizer(model, '
        'accum_jax.accumulate(optax.adam(1e-3), k), wrt=nnx.Param); got '
        f'{type(optimizer).__name__}.'
    )
  who = 'nnx_train_step'
  own = [n for n, v in (('num_microbatches', num_microbatches),
                        ('options', options))
         if v is not None and _options.declared(loss_fn, n)]
  if own:
    raise TypeError(
        f'{who}: {", ".join(n + "=" for n in own)} is {who}\'s own keyword, '
        'and loss_fn has a parameter of that name too; bind the loss\'s with '
        'functools.partial (or rename it).')
  if options is None:
    given, kwargs = _options.split(kwargs, extra=('batch_argnum',))
    both = [n for n in given if _options.declared(loss_fn, n)]
    if both:
      raise TypeError(
          f'{who}: {", ".join(n + "=" for n in both)} names a loop option and '
          'a parameter of loss_fn. Pass the loop\'s options as options='
          'accum_jax.LoopOptions(...): every other keyword then reaches '
          'loss_fn.')
    _options.renamed(given, 'batch_argnum', 'batch_argnums', who)
    options = _options.make(None, who=who, **given)
  else:
    options = _options.make(options, who=who)
  _options.refuse(options, who, ('batch_argnames',),
                  'pass batched keyword arrays in the batch (a tuple batch '
                  'with batch_argnums=(1, 2) for several arguments).')
  batch_argnum = _check_batch_argnum(
      1 if options.batch_argnums is None else options.batch_argnums,
      len(args), batch)
  tx = optimizer.tx
  graph = getattr(optimizer, 'graph', None)
  nodes, at, args, kwargs = _take_nodes(args, kwargs)
  # The model and the NNX arguments are split together, so a variable they
  # share (e.g. an Rngs held by the model and passed in) is threaded once;
  # only the model's variables under optimizer.wrt are differentiated.
  trained = nnx.filterlib.to_predicate(optimizer.wrt)

  def wrt(path, value):
    return path[:1] == (0,) and trained(path[1:], value)

  graphdef, params, rest = nnx.split((model, nodes), wrt, ..., graph=graph)
  params = nnx.as_pure(params[0] if 0 in params else nnx.State({}))
  rest = nnx.as_pure(rest)
  # A model with nothing but trained variables needs no carry (the plain,
  # cheapest loop); otherwise the rest is threaded through the micro-batches.
  stateful = bool(jax.tree.leaves(rest))

  def loss(params, microbatch, *extra, **kw):
    state, extra = (extra[0], extra[1:]) if stateful else (rest, extra)
    module, new_nodes = nnx.merge(graphdef, nnx.State({0: params}), state)
    extra, kw = _put_nodes(extra, kw, new_nodes, at)
    extra = _insert_batch(list(extra), microbatch, batch_argnum)
    out = loss_fn(module, *extra, **kw)
    if not stateful:
      return out
    _, _, new_rest = nnx.split((module, new_nodes), wrt, ..., graph=graph)
    return out, nnx.as_pure(new_rest)

  opt_state = nnx.as_pure(optimizer.opt_state)
  loop = _loop_for(tx, opt_state, loss, num_microbatches, 'optimizer.tx',
                   who, options, stateful,
                   _split.BatchArgs.make(1, (), _options.one_axis(options,
                                                                  who)))
  _check_opt_state(tx, opt_state, 'optimizer')
  try:
    value, updates, opt_state, new_rest = _scan.optimizer_step(
        loop, tx, _loop.inputs(loop, params, batch, args, kwargs,
                               rest if stateful else None), opt_state)
  except flax_errors.TraceContextError as e:
    raise ValueError(
        'loss_fn closes over an NNX object (an nnx.Rngs, a module) that it '
        'updates: nnx_train_step traces loss_fn inside a lax.scan over the '
        'micro-batches, where an NNX object from outside cannot change. Pass '
        'it as an argument instead, e.g. nnx_train_step(model, optimizer, '
        'batch, loss_fn, rngs, batch_argnum=2) for loss_fn(model, rngs, '
        'batch): it is then threaded through the micro-batches, a fresh key '
        f'for each. ({str(e).splitlines()[0]})') from e
  nnx.update((model, nodes),
             nnx.State({0: optax.apply_updates(params, updates)}),
             new_rest if stateful else rest)
  nnx.update(optimizer.opt_state, nnx.state(opt_state, graph=graph))
  optimizer.step[...] += 1
  return value
