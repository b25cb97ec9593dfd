"""The micro-batch loop: one ``lax.scan`` over the micro-batches of a batch.

A :class:`Loop` is the frozen description of one loop (what to
differentiate, ``k``, weighting, accumulator dtype, non-finite policy,
remat, stacked aux, threaded state, and where to split it over a mesh),
built once by each public driver. :func:`scan` runs it on the rows this
device holds. The carry is built from ``jax.eval_shape``, never by running
a micro-batch outside the loop, and each micro-batch is differentiated inside
the loop body. Every weighting rule lives in the body: a micro-batch's weight
is read, clamped and screened there, and its gradient is pre-weighted (the
backward pass is seeded with the weight) or weighted as it is added.
"""

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from accum_jax import _checks, _noise, _nonfinite, _split, _sums, _varying

RNG_KWARG = 'rng'
NUM_REAL_KWARG = 'num_real_microbatches'


@dataclasses.dataclass(frozen=True)
class Loop:
  """How to run one micro-batch loop.

  Attributes:
    loss_fn: ``loss_fn(params, microbatch, *args, **kwargs)``; with
      ``has_state``, ``loss_fn(params, microbatch, state, *args, **kwargs)``
      returning ``(out, new_state)``.
    num_microbatches: ``k``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    weight_fn: ``weight_fn(microbatch) -> scalar`` weight, or None (weight 1).
    accumulator_dtype: the dtype gradients are summed in (promoted with
      theirs), or None for their own.
    nonfinite: the non-finite policy.
    stack_aux: return each micro-batch's aux stacked instead of reduced.
    remat: None, True or a ``jax.checkpoint_policies`` policy.
    has_state: whether a state is threaded through the micro-batches.
    prescale: pre-weight every gradient inside the differentiated function,
      whatever the loss dtype (set on a mesh where gradients are
      reduce-scattered inside it).
    mesh: the mesh to split the loop over (None: from the context or batch).
    axis_name: the batch axes (None: read from the batch's sharding).
    fsdp_reduce: ``'per_microbatch'`` or ``'per_step'``.
    track_noise_scale: add each micro-batch gradient's squared norm to the
      sums (the noise scale estimator's tally).
  """

  loss_fn: Callable[..., Any]
  num_microbatches: int
  has_aux: bool = False
  weight_fn: Callable[[Any], Any] | None = None
  accumulator_dtype: Any = jnp.float32
  nonfinite: str = 'propagate'
  stack_aux: bool = False
  remat: Any = None
  has_state: bool = False
  prescale: bool = False
  mesh: Any = None
  axis_name: Any = None
  fsdp_reduce: str = 'per_microbatch'
  track_noise_scale: bool = False

  def __post_init__(self):
    _checks.check_accumulator_dtype(self.accumulator_dtype)
    object.__setattr__(self, 'remat', remat_policy(self.remat))

  @property
  def screened(self) -> bool:
    """Whether a micro-batch's weight can differ from 1 (or it be dropped)."""
    return self.weight_fn is not None or self.nonfinite != 'propagate'


def _policies() -> dict[str, Any]:
  """The ``jax.checkpoint_policies`` that are policies (not factories)."""
  out = {}
  for name in dir(jax.checkpoint_policies):
    fn = getattr(jax.checkpoint_policies, name)
    try:
      first = next(iter(inspect.signature(fn).parameters), None)
    except (TypeError, ValueError):
      continue
    if first in ('prim', '_'):
      out[name] = fn
  return out


def remat_policy(remat: Any) -> Any:
  """``remat`` as None, True or a policy; also by the names the planner
  prints: ``'none'``, ``'full'``, a ``jax.checkpoint_policies`` policy name
  (``'dots_saveable'``) or ``'save_only_these_names(a, b)'``."""
  if not isinstance(remat, str):
    if remat is not None and not isinstance(remat, bool) and not callable(
        remat):
      raise TypeError(
          'remat must be None, True, a jax.checkpoint_policies policy or its '
          f'name; got {remat!r}.'
      )
    return remat
  names = _policies()
  if remat == 'none':
    return None
  if remat == 'full':
    return True
  if remat in names:
    return names[remat]
  match = re.fullmatch(r'save_only_these_names\((.*)\)', remat)
  if match:
    return jax.checkpoint_policies.save_only_these_names(
        *[n.strip() for n in match.group(1).split(',') if n.strip()])
  raise ValueError(
      f'remat={remat!r} is not a remat option; use None, True, a '
      'jax.checkpoint_policies policy, or one of the names '
      f"{['none', 'full', *sorted(names)]} or "
      "'save_only_these_names(name, ...)'."
  )


class Inputs(NamedTuple):
  """One call's inputs: what is differentiated, split and passed along.

  Attributes:
    params: differentiated.
    batch: split into micro-batches along its leading axis.
    args: passed to every micro-batch.
    kwargs: passed to every micro-batch (``rng`` folded per micro-batch).
    num_real: traced int32 count of real micro-batches, or None (all).
    state: the threaded state (``Loop.has_state``), else None.
  """

  params: Any
  batch: Any
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  num_real: jax.Array | None = None
  state: Any = None


class Result(NamedTuple):
  """What a loop returns: its sums, the last state, one micro-batch's shapes."""

  sums: _sums.Sums
  state: Any
  shapes: _sums.Shapes


def inputs(loop: Loop, params, batch, args, kwargs, state=None) -> Inputs:
  """A call's :class:`Inputs`, with ``num_real_microbatches`` taken out of
  ``kwargs``."""
  num_real = None
  if NUM_REAL_KWARG in kwargs:
    kwargs = dict(kwargs)
    num_real = check_num_real(kwargs.pop(NUM_REAL_KWARG), loop.num_microbatches)
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


def fold_rng(kwargs: dict[str, Any], index: jax.Array) -> dict[str, Any]:
  """Gives micro-batch (or device) ``index`` its own key(s):
  ``fold_in(rng, index)``."""
  if kwargs.get(RNG_KWARG) is None:
    return kwargs
  rng = jax.tree.map(lambda key: jax.random.fold_in(key, index),
                     kwargs[RNG_KWARG])
  return {**kwargs, RNG_KWARG: rng}


def _split_out(loop: Loop, out):
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
  if loop.has_aux:
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


def _grad_fn(loop: Loop, prescale: bool):
  """``(params, mb, args, kwargs, weight) -> ((value, (aux, state)), grads)``,
  where ``grads`` is the gradient of ``weight * value`` when ``prescale``."""

  def loss(params, microbatch, args, kwargs):
    value, aux, new_state = _split_out(
        loop, loop.loss_fn(params, microbatch, *args, **kwargs))
    return value, (aux, new_state)

  if loop.remat is not None and loop.remat is not False:
    policy = None if loop.remat is True else loop.remat
    loss = jax.checkpoint(loss, policy=policy, static_argnums=())
  if prescale:
    def weighted(params, microbatch, args, kwargs, weight):
      value, aux = loss(params, microbatch, args, kwargs)
      return weight.astype(value.dtype) * value, (value, aux)

    grad = jax.value_and_grad(weighted, has_aux=True)

    def prescaled(params, microbatch, args, kwargs, weight):
      (_, (value, aux)), grads = grad(params, microbatch, args, kwargs, weight)
      return (value, aux), grads

    return prescaled
  grad = jax.value_and_grad(loss, has_aux=True)
  return lambda params, microbatch, args, kwargs, weight: grad(
      params, microbatch, args, kwargs)


def _weight(loop: Loop, microbatch) -> jax.Array:
  if loop.weight_fn is None:
    return jnp.ones([], jnp.float32)
  weight = _checks.check_weight(loop.weight_fn(microbatch),
                                from_weight_fn=True)
  # Clamped here, before it seeds the backward pass: a traced negative
  # weight counts as 0.
  return jnp.where(weight < 0, jnp.zeros_like(weight), weight)


def scan(loop: Loop, inp: Inputs, start: Any = None) -> Result:
  """Runs ``loop`` on every micro-batch of ``inp.batch`` in one ``lax.scan``.

  ``start`` (the gradient sum of a window left part-full) seeds the gradient
  sum; its buffer is the scan's carry. With a threaded state, micro-batch
  ``j`` sees the state left by micro-batch ``j - 1`` and the result holds the
  last one; a padding or dropped micro-batch leaves it unchanged.
  """
  k = loop.num_microbatches
  _checks.check_floating(inp.params, 'Params')
  reshaped = _split.reshape_batch(inp.batch, k)

  def one(index, state, prescale):
    microbatch = _split.take_microbatch(reshaped, index)
    extra = (state,) if loop.has_state else ()
    weight = _weight(loop, microbatch)
    (value, (aux, new_state)), grads = _grad_fn(loop, prescale)(
        inp.params, microbatch, extra + inp.args, fold_rng(inp.kwargs, index),
        weight)
    return (value, aux, grads, weight), new_state

  index0 = jax.ShapeDtypeStruct((), jnp.int32)
  outs_like, new_state_like = jax.eval_shape(
      functools.partial(one, prescale=False), index0, inp.state)
  value_like, aux_like, grads_like, _ = outs_like
  shapes = _sums.Shapes(value_like, aux_like, grads_like)
  _checks.check_floating(grads_like, 'Gradient')
  if loop.has_state:
    _check_state(new_state_like, inp.state)
  # Differentiating weight * loss seeds the backward pass with the weight, so
  # the gradient adds straight into the carry; scaling it afterwards kept a
  # scatter gradient (an embedding's) in a buffer of its own (+3% on an LM).
  # Not for a bf16/fp16 loss, whose seed would round the weight.
  prescale = loop.prescale or (loop.weight_fn is not None
                               and jnp.finfo(value_like.dtype).bits >= 32)
  sums0 = _sums.Sums.zeros(
      shapes, loop.accumulator_dtype,
      reduce_aux=loop.has_aux and not loop.stack_aux,
      count_bad=loop.nonfinite != 'propagate',
      grads=start,
      noise=_noise.Tally.zeros() if loop.track_noise_scale else None)
  num_real = inp.num_real
  # A micro-batch's size for the noise scale: its weight, else its rows.
  rows = _split.batch_size(inp.batch, k) // k

  def step(carry, index):
    """Adds micro-batch ``index`` (a real one) to the sums."""
    sums, state = carry
    (value, aux, grads, weight), new_state = one(index, state, prescale)
    micro = _sums.Micro(value, aux, grads, weight, None,
                        jnp.ones_like(weight) if prescale else None)
    if loop.screened:
      micro = _nonfinite.screen(loop.nonfinite, micro,
                                weighted=loop.weight_fn is not None,
                                lazy_skip_step=True)
      if loop.has_state and micro.bad is not None:  # a dropped micro-batch
        new_state = jax.tree.map(
            lambda old, new: jnp.where(micro.bad > 0, old, new), state,
            new_state)
    if loop.track_noise_scale:
      # The squared norm of the gradient as it exists here, before it is
      # added into the carry: no second pass, no buffer of its own.
      micro = micro._replace(noise=_noise.piece(
          micro.grads, micro.weight,
          micro.weight if loop.weight_fn is not None else rows,
          prescaled=prescale))
    stacked = (micro.aux, micro.weight) if loop.stack_aux else None
    return (sums.add(micro), new_state), stacked

  def padding(carry, index):
    """A padding micro-batch: not computed; the carry passes through."""
    stacked_like = jax.eval_shape(step, carry, index)[1]
    return carry, jax.tree.map(_varying.zeros_like_struct, stacked_like)

  @functools.partial(jax.named_call, name='accum_jax_microbatch')
  def body(carry, index):
    if num_real is None:
      return step(carry, index)
    # The cond covers the whole carry update and its padding branch passes
    # the carry through, so XLA adds the gradient into the carry in place. A
    # cond returning the micro-batch's gradient (zeros for padding) gave that
    # gradient a buffer of its own: a parameter-sized temporary in the loop.
    return jax.lax.cond(index < num_real, step, padding, carry, index)

  # A no-op outside shard_map. On `step`: the cond in `body` needs a carry
  # that is already as device-varying as a real micro-batch makes it.
  init = _varying.match_carry(step, (sums0, inp.state))
  (sums, state), stacked = jax.lax.scan(body, init,
                                        jnp.arange(k, dtype=jnp.int32))
  if loop.stack_aux:
    aux, weights = stacked
    sums = sums._replace(aux=aux, aux_weights=weights)
  return Result(sums, state, shapes)


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
