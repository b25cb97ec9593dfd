"""The micro-batch loop: one ``lax.scan`` over the micro-batches of a batch.

A :class:`LoopSpec` describes one loop: the loss, ``k``, the user's
:class:`accum_jax.LoopOptions`, which arguments hold the batch, and the
transform's accumulator dtype, non-finite policy, skip predicate and noise
tally. Each driver builds one; :func:`scan` runs it on the rows this device
holds. The carry is built from one trace of a micro-batch
(``jax.make_jaxpr``), never by running one outside the loop. The body
reads: the micro-batch's gradient (pre-weighted where that is exact: the
backward pass is seeded with the weight), then the
:class:`accum_jax._accumulator.Accumulator`'s ``screen`` and ``add``.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from accum_jax import (
  _accumulator,
  _checks,
  _compat,
  _keys,
  _options,
  _split,
  _sums,
  _varying,
)

RNG_KWARG = 'rng'
NUM_REAL_KWARG = 'num_real_microbatches'


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """The description of one micro-batch loop, built once by each driver.

  Attributes:
    loss_fn: ``loss_fn(params, microbatch, *args, **kwargs)``; with
      ``has_state``, ``loss_fn(params, microbatch, state, *args, **kwargs)``
      returning ``(out, new_state)``. With ``batch_args``, the micro-batch
      goes in the batched arguments' places instead.
    num_microbatches: ``k``.
    options: the user's :class:`accum_jax.LoopOptions`.
    batch_args: which arguments hold the batch, and their batch axes.
    accumulator_dtype: the dtype gradients are summed in (promoted with
      theirs), or None for their own.
    nonfinite: the non-finite policy.
    should_skip_update_fn: ``fn(grads, gradient_step, params) ->
      (should_skip, info)`` asked for every micro-batch (``Inputs`` then
      carries the gradient step and the previous info), or None.
    track_noise_scale: add each micro-batch gradient's squared norm to the
      sums (the noise scale estimator's tally).
    has_state: whether a state is threaded through the micro-batches.
    prescale: pre-weight every gradient inside the differentiated function,
      whatever the loss dtype (set on a mesh where gradients are
      reduce-scattered inside it).
  """

  loss_fn: Callable[..., Any]
  num_microbatches: int
  options: _options.LoopOptions = _options.DEFAULT
  batch_args: _split.BatchArgs = _split.BatchArgs()
  accumulator_dtype: Any = jnp.float32
  nonfinite: str = 'propagate'
  should_skip_update_fn: Callable[..., Any] | None = None
  track_noise_scale: bool = False
  has_state: bool = False
  prescale: bool = False

  def __post_init__(self):
    _checks.check_accumulator_dtype(self.accumulator_dtype)
    if self.has_state and (self.options.per_example_fn is not None
                           or not self.batch_args.single):
      raise ValueError('A threaded state needs the batch as the argument after'
                       ' params, and no per-example transform.')

  @property
  def aux_axis(self) -> int:
    """The row axis of per-row aux: the batch axis, when every batched
    argument has the same one; else 0."""
    axes = set(self.batch_args.axes)
    return axes.pop() if len(axes) == 1 else 0

  @property
  def lazy_skip_step(self) -> bool:
    """Whether micro-batches are screened lazily (``'skip_step'``, no skip
    predicate): their gradients' finiteness is read from the window's sum."""
    return self.nonfinite == 'skip_step' and self.should_skip_update_fn is None

  @property
  def sum_check(self) -> bool:
    """Whether the gradients' finiteness is read once, from the window's sum
    after the loop, rather than per micro-batch (see ``_compat``)."""
    return self.lazy_skip_step and _compat.READS_SUM_AFTER_LOOP_IN_PLACE

  @property
  def screened(self) -> bool:
    """Whether a micro-batch's weight can differ from 1 (or it be dropped)."""
    return (self.options.weight_fn is not None or self.nonfinite != 'propagate'
            or self.should_skip_update_fn is not None)


class Inputs(NamedTuple):
  """One call's inputs: what is differentiated, split and passed along.

  Attributes:
    params: differentiated.
    batch: split into micro-batches along its batch axis: the argument after
      params, or with several batched arguments (``LoopSpec.batch_args``) a tuple
      of them.
    args: passed to every micro-batch (with several batched arguments, all
      positional arguments after params, the batched ones as None).
    kwargs: passed to every micro-batch (``rng`` folded per micro-batch).
    num_real: traced int32 count of real micro-batches, or None (all).
    state: the threaded state (``LoopSpec.has_state``), else None.
    gradient_step: with ``LoopSpec.should_skip_update_fn``, the step passed to
      it (the transform's ``state.step``).
    skip_state: with ``LoopSpec.should_skip_update_fn``, its info before the
      first micro-batch (the transform's ``state.skip_state``).
  """

  params: Any
  batch: Any
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  num_real: jax.Array | None = None
  state: Any = None
  gradient_step: Any = None
  skip_state: Any = None


class Result(NamedTuple):
  """What a loop returns: its sums (with the skip predicate's info for the
  last real micro-batch), the last state, and one micro-batch's shapes."""

  sums: _sums.Sums
  state: Any
  shapes: _sums.Shapes

  def mean_grads(self) -> Any:
    """The weighted mean gradient, in the gradients' dtypes."""
    return _sums.mean_of(self.sums.grads, self.sums.weight, self.shapes.grads)


def inputs(loop: LoopSpec, params, batch, args, kwargs, state=None) -> Inputs:
  """A call's :class:`Inputs`, with ``num_real_microbatches`` taken out of
  ``kwargs``."""
  return call_inputs(loop, params, (batch, *args), kwargs, state)


def call_inputs(loop: LoopSpec, params, args, kwargs, state=None) -> Inputs:
  """:func:`inputs` from all of ``loss_fn``'s arguments after params."""
  num_real = None
  if NUM_REAL_KWARG in kwargs:
    kwargs = dict(kwargs)
    num_real = check_num_real(kwargs.pop(NUM_REAL_KWARG), loop.num_microbatches)
  if loop.batch_args.single and not args and 'batch' in kwargs:
    kwargs = dict(kwargs)  # f(params, batch=...), as the drivers always took
    args = (kwargs.pop('batch'),)
  batch, args, kwargs = loop.batch_args.pick(tuple(args), kwargs)
  return Inputs(params, batch, tuple(args), kwargs, num_real, state)


def check_num_real(r: Any, num_microbatches: int) -> jax.Array:
  if np.ndim(r) != 0 or not jnp.issubdtype(jnp.result_type(r), jnp.integer):
    raise TypeError(
        f'{NUM_REAL_KWARG} must be an integer scalar, got shape '
        f'{np.shape(r)} and dtype {jnp.result_type(r)}.'
    )
  if not isinstance(r, jax.core.Tracer):
    value = int(np.asarray(r))
    if not 0 <= value <= num_microbatches:
      raise ValueError(
          f'{NUM_REAL_KWARG} must be in [0, {num_microbatches}] '
          f'(num_microbatches), got {value}.'
      )
  return jnp.asarray(r, jnp.int32)


def is_key(x: Any) -> bool:
  """Whether ``x`` is a new-style (typed) PRNG key array."""
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def fold_key(key: Any, index: jax.Array) -> Any:
  """``jax.random.fold_in(key, index)`` for a key (new-style, or a raw
  ``uint32[2]``), or a new-style key array of any shape (each key folded)."""
  if not is_key(key) or np.ndim(key) == 0:
    return jax.random.fold_in(key, index)
  flat = jnp.reshape(key, (-1,))
  return jnp.reshape(jax.vmap(lambda k: jax.random.fold_in(k, index))(flat),
                     np.shape(key))


def fold_rng(args: tuple[Any, ...], kwargs: dict[str, Any],
             index: jax.Array) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """Gives micro-batch (or device, or example) ``index`` its own keys:
  ``fold_in(key, index)`` for every leaf of ``rng=`` (new-style or raw keys)
  and for every new-style PRNG key elsewhere in the (unsplit) arguments, so
  no two micro-batches draw the same dropout mask. Raw ``uint32`` keys
  outside ``rng=`` look like data and pass unchanged."""

  def fold_typed(tree):
    return jax.tree.map(lambda x: fold_key(x, index) if is_key(x) else x,
                        tree)

  rng = kwargs.get(RNG_KWARG)
  kwargs = fold_typed({n: v for n, v in kwargs.items() if n != RNG_KWARG})
  if rng is not None:
    kwargs[RNG_KWARG] = jax.tree.map(lambda key: fold_key(key, index), rng)
  return fold_typed(tuple(args)), kwargs


def _split_out(loop: LoopSpec, out):
  """``loss_fn``'s output as ``(value, aux, new_state)``, or a clear error."""
  new_state = None
  if loop.has_state:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
          'With a carried state, loss_fn must return (out, new_state), where '
          'out is the loss (or (loss, aux) with has_aux=True); got '
          f'{type(out).__name__}'
          + (f' of length {len(out)}' if isinstance(out, (tuple, list))
             else '') + '.'
      )
    out, new_state = out
  if loop.options.has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      if isinstance(out, (tuple, list)):
        got = f'a {type(out).__name__} of length {len(out)}'
      elif hasattr(out, 'shape'):
        got = f'a single array of shape {np.shape(out)}'
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
  if isinstance(value, (bool, int, float, np.number)):
    value = jnp.asarray(value)  # a constant loss, as jax.value_and_grad takes
  if not hasattr(value, 'dtype'):
    hint = (' (to return more than the loss, return (loss, aux) with '
            'has_aux=True)' if isinstance(value, (dict, tuple, list)) else '')
    raise TypeError(
        f'loss_fn must return a scalar loss, got a {type(value).__name__}'
        f'{hint}.'
    )
  if np.shape(value) != ():
    raise TypeError(
        'loss_fn must return a scalar loss, got shape '
        f'{np.shape(value)}.'
    )
  if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
    raise TypeError(
        f'loss_fn must return a floating loss, got {jnp.result_type(value)}.'
    )
  return value, aux, new_state


def _value_and_grad(loop: LoopSpec, prescale: bool):
  """``(params, mb, args, kwargs, weight) -> ((scaled, (value, aux, state)),
  grads)``: the gradient of ``weight * value`` when ``prescale``, else of
  ``value``. One function is differentiated, so that the user's loss is
  called from it directly."""

  def differentiated(params, microbatch, args, kwargs, weight):
    args, kwargs = loop.batch_args.put(microbatch, args, kwargs)
    value, aux, new_state = _split_out(
        loop, loop.loss_fn(params, *args, **kwargs))
    scaled = weight.astype(value.dtype) * value if prescale else value
    return scaled, (value, aux, new_state)

  remat = loop.options.remat
  if remat is not None and remat is not False:
    differentiated = jax.checkpoint(
        differentiated, policy=None if remat is True else remat,
        static_argnums=())
  grad = jax.value_and_grad(differentiated, has_aux=True)
  if loop.options.per_example_fn is not None:
    return _per_example(loop, grad)
  return grad


def _reduce_rows(x):
  """One micro-batch's aux from its examples' (leading axis): floating
  leaves averaged, integer leaves summed, boolean leaves OR-ed."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.mean(x.astype(_sums.sum_dtype(x.dtype)), 0).astype(x.dtype)
  if x.dtype == jnp.bool_:
    return jnp.any(x, 0)
  return jnp.sum(x, 0, dtype=x.dtype)


def _per_example(loop: LoopSpec, grad):
  """The micro-batch step of ``per_example_fn``: each example's gradient (a
  batch of one row, by ``jax.vmap``), transformed, then averaged; the loss
  is the examples' mean, the aux reduced over them (or kept per row)."""
  axes = loop.batch_args.tree_axes

  def one_row(params, row, index, args, kwargs):
    row = _split.map_axes(jnp.expand_dims, axes, row)
    args, kwargs = fold_rng(args, kwargs, index)
    # Unweighted: the weight is applied after the transform, which need not
    # be linear.
    (_, (value, aux, _)), grads = grad(params, row, args, kwargs,
                                       jnp.ones([], jnp.float32))
    out = loop.options.per_example_fn(grads)
    if jax.tree.structure(out) != jax.tree.structure(grads) or any(
        np.shape(o) != np.shape(g) for o, g in
        zip(jax.tree.leaves(out), jax.tree.leaves(grads))):
      raise ValueError(
          'per_example_fn must return a gradient like the one it is given '
          f'(structure {jax.tree.structure(grads)}, shapes '
          f'{[np.shape(g) for g in jax.tree.leaves(grads)]}); got structure '
          f'{jax.tree.structure(out)}, shapes '
          f'{[np.shape(o) for o in jax.tree.leaves(out)]}.'
      )
    return value, aux, out

  def step(params, microbatch, args, kwargs, weight):
    del weight  # applied after the transform, which need not be linear
    rows = _split.batch_size(microbatch, 1, axes)
    values, aux, grads = jax.vmap(
        one_row, in_axes=(None, axes, 0, None, None))(
            params, microbatch, jnp.arange(rows, dtype=jnp.int32), args,
            kwargs)
    if loop.options.concat_aux:
      # Each example's aux has one row along aux_axis: the rows in order.
      aux = jax.tree.map(
          lambda a: jnp.squeeze(jnp.moveaxis(a, 0, loop.aux_axis % (a.ndim - 1)),
                                loop.aux_axis % (a.ndim - 1) + 1), aux)
    elif aux is not None:
      aux = jax.tree.map(_reduce_rows, aux)
    value = _reduce_rows(values)
    return (value, (value, aux, None)), jax.tree.map(_reduce_rows, grads)

  return step


def _weight(loop: LoopSpec, microbatch) -> jax.Array:
  weight_fn = loop.options.weight_fn
  if weight_fn is None:
    return jnp.ones([], jnp.float32)
  args, kwargs = loop.batch_args.weight_args(microbatch)
  weight = _checks.check_weight(weight_fn(*args, **kwargs),
                                from_weight_fn=True)
  # Clamped here, before it seeds the backward pass: a traced negative
  # weight counts as 0.
  return jnp.where(weight < 0, jnp.zeros_like(weight), weight)


def _unsplit_hint(inp: Inputs, size: int, k: int) -> str | None:
  """Names the arguments passed whole to every micro-batch whose leading
  size is the batch's: the likely cause of a loss that fails on a
  micro-batch of ``size // k`` rows."""
  named = [(f'positional argument {i} after the batch', x)
           for i, x in enumerate(inp.args)]
  named += [(f'keyword argument {name!r}', x)
            for name, x in inp.kwargs.items()]
  found = []
  for name, tree in named:
    shapes = {np.shape(x) for x in jax.tree.leaves(tree) if np.ndim(x)}
    if any(shape[0] == size for shape in shapes):
      found.append(f'{name} (leading size {size})')
  if not found or k == 1:
    return None
  return (f'{", ".join(found)} has the batch\'s leading size {size} but is '
          f'passed whole to each micro-batch of {size // k} rows. If it is '
          'batched, split it with the batch: batch_argnums= / batch_argnames= '
          '(value_and_grad, value_and_update), a tuple batch_argnum= with a '
          'tuple batch (nnx_train_step), or put it in the batch pytree.')


def scan(loop: LoopSpec, inp: Inputs, start: Any = None) -> Result:
  """Runs ``loop`` on every micro-batch of ``inp.batch`` in one ``lax.scan``.

  ``start`` (the gradient sum of a window left part-full) seeds the gradient
  sum; its buffer is the scan's carry. With a threaded state, micro-batch
  ``j`` sees the state left by micro-batch ``j - 1`` and the result holds the
  last one; a padding or dropped micro-batch leaves it unchanged.
  """
  k = loop.num_microbatches
  options = loop.options
  _checks.check_floating(inp.params, 'Params')
  axes = loop.batch_args.tree_axes
  reshaped = _split.reshape_batch(inp.batch, k, axes)
  rows = _split.batch_size(inp.batch, k, axes) // k

  def probe(index, state):
    """One micro-batch's outputs, unweighted: traced once, for the shapes."""
    microbatch = _split.take_microbatch(reshaped, index, axes)
    extra = (state,) if loop.has_state else ()
    args, kwargs = fold_rng(inp.args, inp.kwargs, index)
    weight = _weight(loop, microbatch)
    (_, (value, aux, new_state)), grads = _value_and_grad(loop, False)(
        inp.params, microbatch, extra + args, kwargs, weight)
    return (value, aux, grads, weight), new_state

  index0 = jax.ShapeDtypeStruct((), jnp.int32)
  try:
    traced, (outs_like, new_state_like) = jax.make_jaxpr(
        probe, return_shape=True)(index0, inp.state)
  except (TypeError, ValueError) as e:
    hint = _unsplit_hint(inp, rows * k, k)
    if hint is None:
      raise
    raise ValueError(f'{hint} The loss failed on a micro-batch with: '
                     f'{type(e).__name__}: {str(e).splitlines()[0]}') from e
  if k > 1 and _keys.fixed_draws(traced):
    warnings.warn(_keys.MESSAGE, stacklevel=4)
  value_like, aux_like, grads_like, _ = outs_like
  shapes = _sums.Shapes(value_like, aux_like, grads_like,
                        _sums.summed_leaves(options.aux_modes, aux_like))
  _checks.check_floating(grads_like, 'Gradient')
  if loop.has_state:
    _check_state(new_state_like, inp.state)
  if options.concat_aux:
    _check_rows(aux_like, rows, loop.aux_axis)
  # Differentiating weight * loss seeds the backward pass with the weight, so
  # the gradient adds straight into the carry; scaling it afterwards kept a
  # scatter gradient (an embedding's) in a buffer of its own (+3% on an LM).
  # Not for a bf16/fp16 loss, whose seed would round the weight, nor under a
  # per-example transform, which need not be linear, nor with a skip
  # predicate, which must see the unweighted gradient.
  prescale = loop.prescale or (options.weight_fn is not None
                               and options.per_example_fn is None
                               and loop.should_skip_update_fn is None
                               and jnp.finfo(value_like.dtype).bits >= 32)
  grad = _value_and_grad(loop, prescale)
  aux_mode = None
  if options.has_aux:
    aux_mode = ('stack' if options.stack_aux else
                'concat' if options.concat_aux else 'reduce')
  acc = _accumulator.Accumulator(
      shapes, k, loop.accumulator_dtype, nonfinite=loop.nonfinite,
      weighted=options.weight_fn is not None,
      skip_fn=loop.should_skip_update_fn,
      lazy_skip_step=loop.lazy_skip_step, check_grads=not loop.sum_check,
      # A micro-batch's size for the noise scale: its weight, else its rows.
      noise_rows=rows if loop.track_noise_scale else None,
      aux=aux_mode, aux_axis=loop.aux_axis, prescaled=prescale)

  @functools.partial(jax.named_call, name='accum_jax_microbatch')
  def step(carry, index):
    """Adds micro-batch ``index`` (a real one): gradient, screen, add."""
    sums, state = carry
    microbatch = _split.take_microbatch(reshaped, index, axes)
    weight = _weight(loop, microbatch)
    # The threaded state is not folded: an nnx.Rngs in it advances its own
    # counter per micro-batch.
    args, kwargs = fold_rng(inp.args, inp.kwargs, index)
    extra = (state,) if loop.has_state else ()
    (_, (value, aux, new_state)), grads = grad(
        inp.params, microbatch, extra + args, kwargs, weight)
    micro, sums, dropped = acc.screen(
        sums, _sums.Micro(value, aux, grads, weight, None,
                          acc.grad_scale(weight)),
        inp.gradient_step, inp.params)
    if loop.has_state and dropped is not None:  # a dropped micro-batch
      new_state = jax.tree.map(lambda old, new: jnp.where(dropped, old, new),
                               state, new_state)
    sums, stacked = acc.add(sums, micro, index)
    return (sums, new_state), stacked

  num_real = inp.num_real
  skip_info = (inp.skip_state if loop.should_skip_update_fn is not None
               else None)
  # A no-op outside shard_map. On `step`: the cond below needs a carry that
  # is already as device-varying as a real micro-batch makes it.
  init = _varying.match_carry(step, (acc.init(start, skip_info), inp.state))
  if num_real is None:
    (sums, state), stacked = jax.lax.scan(
        step, init, jnp.arange(k, dtype=jnp.int32), unroll=options.unroll)
  elif options.unroll != 1:
    (sums, state), stacked = jax.lax.scan(
        functools.partial(_real_or_padding, step, num_real), init,
        jnp.arange(k, dtype=jnp.int32), unroll=options.unroll)
  else:
    (sums, state), stacked = _real_only(step, init, num_real, k)
  return Result(acc.finish(sums, stacked), state, shapes)


def _real_or_padding(step, num_real, carry, index):
  """``step`` on a real micro-batch; a padding one is not computed and the
  carry passes through, by a cond over the whole carry update. (XLA:GPU
  gives that cond's carry a buffer of its own; unrolling is for XLA:CPU, see
  docs/unroll.md.) A padding micro-batch is not a micro-step: the skip info
  stays too."""

  def padding(carry, index):
    stacked_like = jax.eval_shape(step, carry, index)[1]
    return carry, jax.tree.map(_varying.zeros_like_struct, stacked_like)

  return jax.lax.cond(index < num_real, step, padding, carry, index)


def _real_only(step, init, num_real, k):
  """``lax.scan(step, init, arange(k))`` over the first ``num_real``
  micro-batches only: a ``while_loop`` that stops after the real ones, the
  stacked outputs written into zeros of ``k`` rows. The padding micro-batches
  are never computed, and with no cond in the body every compiler adds each
  gradient into the carry in place (a cond per micro-batch held a second
  parameter-sized carry on XLA:GPU: 1.24x the twin's peak on an H100)."""
  stacked_like = jax.eval_shape(step, init, jax.ShapeDtypeStruct((),
                                                                 jnp.int32))[1]
  stacked0 = jax.tree.map(
      lambda s: _varying.to_varying(jnp.zeros((k, *s.shape), s.dtype),
                                    tuple(_varying.varying_axes(s))),
      stacked_like)

  def body(carry):
    index, inner, stacked = carry
    inner, out = step(inner, index)
    stacked = jax.tree.map(
        lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, index, 0),
        stacked, out)
    return index + 1, inner, stacked

  _, carry, stacked = jax.lax.while_loop(
      lambda c: c[0] < num_real, body,
      (jnp.zeros([], jnp.int32), init, stacked0))
  return carry, stacked


def _check_rows(aux_like, rows: int, axis: int):
  """With ``aux='concat'``, every aux leaf has a row per row of the
  micro-batch along ``axis``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(aux_like):
    shape = np.shape(leaf)
    if not -len(shape) <= axis < len(shape) or shape[axis] != rows:
      raise ValueError(
          f"aux='concat' returns the aux of every row, so every aux leaf "
          f'needs one entry per row of the micro-batch ({rows} rows) along '
          f'axis {axis}; aux leaf {jax.tree_util.keystr(path) or "<aux>"} has '
          f'shape {shape}. Return per-batch values (a mean, a count) from a '
          "second call, or use aux='stack'."
      )


def _check_state(new_like, state):
  """The state loss_fn returns must match the state it was given."""
  if jax.tree.structure(new_like) != jax.tree.structure(state):
    raise ValueError(
        'loss_fn must return its new state with the structure of the state it '
        f'was given:\n  given: {jax.tree.structure(state)}\n  returned: '
        f'{jax.tree.structure(new_like)}'
    )
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(new_like),
                              jax.tree.leaves(state), strict=True):
    if (np.shape(new), jnp.result_type(new)) != (np.shape(old),
                                                  jnp.result_type(old)):
      raise ValueError(
          f'loss_fn returned state leaf {jax.tree_util.keystr(path)} with '
          f'shape {np.shape(new)} and dtype {jnp.result_type(new)}, but it was'
          f' given shape {np.shape(old)} and dtype {jnp.result_type(old)}.'
      )
