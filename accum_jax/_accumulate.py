"""The ``accumulate`` gradient transformation.

``accumulate(inner, k)`` keeps a running weighted sum of gradients and applies
``inner`` once every ``k`` calls, to the weighted mean. Between window ends it
returns zero updates and leaves ``inner``'s state untouched; the inner update
runs inside a ``lax.switch`` branch, so it is never computed on other calls.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from accum_jax import _checks, _noise, _nonfinite, _norms
from accum_jax._sums import Micro, acc_dtype, add_weighted, mean_of


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    count: int32 scalar, micro-steps taken in the current window (``0 <= count
      < k`` between calls).
    acc: the weighted sum of the window's gradients, a pytree like the params,
      in the accumulator dtype; ``()`` with ``cross_step=False`` (the sum
      lives only inside each in-step call).
    weight: float32 scalar, the sum of the window's weights.
    inner_state: the state of the inner optimizer.
    step: int32 scalar, windows ended so far (optimizer steps, skipped ones
      included); a ``num_microbatches`` schedule is evaluated at it.
    skipped_microbatches: int32 scalar, micro-batches dropped so far for
      non-finite values (``nonfinite='skip_microbatch'`` or ``'skip_step'``).
    skipped_steps: int32 scalar, windows ended so far without an inner update
      because of non-finite values.
    window_nonfinite: bool scalar, whether the current window has seen a
      non-finite micro-batch.
    skip_state: what ``should_skip_update_fn`` returned as info for the last
      micro-step (``optax.MultiSteps``' ``skip_state``); ``()`` without one.
    noise: with ``track_noise_scale=True``, the gradient noise scale
      estimator's scalars (read them with :func:`accum_jax.noise_scale`);
      else ``()`` (an empty node, so the state stays arrays only).
    norms: with ``track_norms``, the global norms of the last ended
      window's mean gradient and updates, a :class:`accum_jax.WindowNorms`
      (read them with :func:`accum_jax.window_norms`; zeros before the first
      window ends); else ``()``.

  It holds arrays only, so every serializer (pickle, orbax,
  ``flax.serialization``) takes it as it is; how it is used (``k``, the
  policy) is the transform's business.
  """

  count: jax.Array
  acc: optax.Updates
  weight: jax.Array
  inner_state: optax.OptState
  step: jax.Array
  skipped_microbatches: jax.Array
  skipped_steps: jax.Array
  window_nonfinite: jax.Array
  skip_state: Any = ()
  noise: Any = ()
  norms: Any = ()


class AccumulateTransformation(optax.GradientTransformationExtraArgs):
  """An :class:`optax.GradientTransformationExtraArgs` made by :func:`accumulate`.

  It is an ordinary optax transformation (an ``(init, update)`` pair) that also
  says how it was built, so the in-step drivers
  (:func:`accum_jax.value_and_update`) can read the window length. ``init``
  and ``update`` are methods of one :class:`AccumulateConfig`, so copies,
  pickles, ``_replace(init=...)`` and pytree round trips keep it.

  Attributes:
    config: the :class:`AccumulateConfig`.
    inner: the inner optimizer, with extra-args support.
    num_microbatches: ``k``, the window length (or a schedule).
    accumulator_dtype: the requested accumulator dtype (``None``: the
      gradients' own).
    nonfinite: the non-finite policy, ``'propagate'``, ``'skip_microbatch'``
      or ``'skip_step'``.
    use_grad_mean: whether ``inner`` sees the window's weighted mean (else
      its weighted sum).
    should_skip_update_fn: the skip predicate, or None.
    cross_step: whether the state keeps the accumulator between calls.
  """

  __slots__ = ()

  @property
  def config(self) -> 'AccumulateConfig':
    return self.update.__self__

  @property
  def inner(self) -> optax.GradientTransformationExtraArgs:
    return self.config.inner

  @property
  def num_microbatches(self) -> int | Callable[[jax.Array], Any]:
    return self.config.num_microbatches

  @property
  def accumulator_dtype(self) -> jnp.dtype | None:
    return self.config.accumulator_dtype

  @property
  def nonfinite(self) -> str:
    return self.config.nonfinite

  @property
  def use_grad_mean(self) -> bool:
    return self.config.use_grad_mean

  @property
  def should_skip_update_fn(self) -> Callable[..., Any] | None:
    return self.config.should_skip_update_fn

  @property
  def cross_step(self) -> bool:
    return self.config.cross_step


# The platforms whose windows are guarded by a lax.cond; elsewhere by selects
# (see AccumulateConfig.finish_window).
COND_PLATFORMS = ('cpu',)


def _own_buffers(state: Any, params: Any) -> Any:
  """``state`` with every concrete array leaf in a buffer of its own, apart
  from each other and from ``params``: a fresh state is donated with the
  params (``jax.jit(step, donate_argnums=(0, 1))``), and XLA refuses to
  donate one buffer twice. An inner optimizer may return one array in two
  places, or hold the params themselves (an anchor, as in EWC); those leaves
  are copied. Under ``jit`` there is nothing to do."""
  seen = {id(x) for x in jax.tree.leaves(params)}

  def own(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      if id(x) in seen:
        x = jnp.copy(x)
      seen.add(id(x))
    return x

  return jax.tree.map(own, state)


def differentiated(params: Any) -> Any:
  """The part of ``params`` the gradients are taken for: the fast params
  of ``optax.lookahead``'s ``LookaheadParams`` (its inner optimizer gets the
  gradient of the fast params and both), else all of them."""
  if isinstance(params, optax.LookaheadParams):
    return params.fast
  return params


def _acc_leaves(acc: Any, params: Any):
  """``(path, accumulator leaf, param leaf or the accumulator leaf)``."""
  like = jax.tree.leaves(params) if params is not None else jax.tree.leaves(acc)
  return [(path, a, p) for (path, a), p in
          zip(jax.tree_util.tree_leaves_with_path(acc), like)]


@dataclasses.dataclass(frozen=True, eq=False)
class AccumulateConfig:
  """How an :func:`accumulate` transform was built, and what it does.

  The transform's ``init`` and ``update`` are this object's methods, so its
  configuration lives in one place and travels with the transform.

  Attributes:
    inner: the inner optimizer, with extra-args support.
    num_microbatches: ``k`` (an int >= 1), or a schedule of the window count.
    accumulator_dtype: the requested accumulator dtype, or None.
    nonfinite: the non-finite policy.
    use_grad_mean: apply ``inner`` to the weighted mean (True) or the
      weighted sum (False) of the window's gradients.
    should_skip_update_fn: ``fn(updates, gradient_step, params) ->
      (should_skip, info)``, asked for every micro-step, or None.
    track_noise_scale: whether the state estimates the gradient noise scale.
    noise_scale_decay: the decay of its EMAs over windows.
    cross_step: whether the state carries the accumulator between calls
      (False: in-step drivers only, ``acc`` is ``()``).
    track_norms: the window norms kept in the state: ``()``, or some of
      ``'grad'`` and ``'update'``.
  """

  inner: optax.GradientTransformationExtraArgs
  num_microbatches: int | Callable[[jax.Array], Any]
  accumulator_dtype: jnp.dtype | None
  nonfinite: str
  use_grad_mean: bool = True
  should_skip_update_fn: Callable[..., Any] | None = None
  track_noise_scale: bool = False
  noise_scale_decay: float = 0.99
  cross_step: bool = True
  track_norms: tuple[str, ...] = ()

  def static_num_microbatches(self, who: str) -> int:
    """``k`` for a driver that needs a static window length."""
    if callable(self.num_microbatches):
      raise TypeError(
          f'{who} runs a fixed number of micro-batches per step, but tx was '
          'built with a num_microbatches schedule. Use accumulate(inner, k) '
          'with an int k for the in-step drivers (rebuild the step, or pass '
          'num_real_microbatches=, to change k in-step); schedules are for '
          'cross-step tx.update calls.'
      )
    return self.num_microbatches

  def window_length(self, step: jax.Array) -> Any:
    """``k`` for the window after ``step`` ended windows (at least 1)."""
    if not callable(self.num_microbatches):
      return self.num_microbatches
    length = self.num_microbatches(jnp.asarray(step, jnp.int32))
    if np.ndim(length) != 0 or not jnp.issubdtype(jnp.result_type(length),
                                                    jnp.integer):
      raise TypeError(
          'A num_microbatches schedule must return an integer scalar, got '
          f'shape {np.shape(length)} and dtype {jnp.result_type(length)}.'
      )
    return jnp.maximum(jnp.asarray(length, jnp.int32), 1)

  def check_state(self, state: Any, params: Any, who: str) -> None:
    """Raises a clear error if ``state`` was not made by this ``init``.

    Compares the accumulator's dtypes and the inner state's structure with
    what this transform's ``init`` makes for these params. (A state made
    with another ``k`` or policy is a valid state: it holds the same arrays.)
    """
    if not isinstance(state, AccumulateState):
      raise TypeError(
          f'{who} expects an AccumulateState, got {type(state).__name__}. '
          'Create it with this transform\'s init.'
      )
    at_rest = not (isinstance(state.acc, tuple) and state.acc == ())
    if at_rest != self.cross_step:
      raise ValueError(
          f'The AccumulateState {"holds" if at_rest else "has no"} '
          'accumulator but this accumulate was built with cross_step='
          f'{self.cross_step}. Create the state with this transform\'s init.'
      )
    diff = differentiated(params)
    if at_rest and diff is not None:
      _checks.check_same_structure(diff, state.acc, 'params', 'accumulator')
    tracked = _noise.tracked(state.noise)
    if tracked != self.track_noise_scale:
      raise ValueError(
          f'The AccumulateState {"has" if tracked else "lacks"}'
          ' the noise scale estimator but this accumulate was built with '
          f'track_noise_scale={self.track_noise_scale}. Create the state with '
          'this transform\'s init.'
      )
    kept = _norms.kept(state.norms)
    if kept != self.track_norms:
      raise ValueError(
          f'The AccumulateState keeps the window norms {kept} but this '
          f'accumulate was built with track_norms={self.track_norms}. Create '
          'the state with this transform\'s init.')
    for path, acc, like in (_acc_leaves(state.acc, diff) if at_rest
                            else ()):
      want = acc_dtype(jnp.result_type(like), self.accumulator_dtype)
      if jnp.result_type(acc) != want:
        raise ValueError(
            f'The AccumulateState\'s accumulator leaf {_checks.path_name(path)}'
            f' has dtype {jnp.result_type(acc)}, but this accumulate sums '
            f'{jnp.result_type(like)} gradients in {want} (accumulator_dtype='
            f'{self.accumulator_dtype}). Create the state with this '
            'transform\'s init.'
        )
    like = params if params is not None or not at_rest else state.acc
    try:
      inner_like = jax.eval_shape(self.inner.init, like)
    except Exception:  # noqa: BLE001 - an init that cannot run abstractly
      return           # is not a mismatch; the inner update will check it.
    treedef = jax.tree.structure(state.inner_state)
    expected_treedef = jax.tree.structure(inner_like)
    if treedef != expected_treedef:
      raise ValueError(
          'The AccumulateState\'s inner_state does not match this '
          f'accumulate\'s inner optimizer:\n  inner_state: {treedef}\n  '
          f'inner.init(params): {expected_treedef}\nCreate the state with '
          'this transform\'s init.'
      )
    skip_like = jax.eval_shape(
        lambda p: _nonfinite.skip_info_like(self.should_skip_update_fn, p),
        like)
    if jax.tree.structure(state.skip_state) != jax.tree.structure(skip_like):
      raise ValueError(
          'The AccumulateState\'s skip_state does not match this '
          'accumulate\'s should_skip_update_fn:\n  skip_state: '
          f'{jax.tree.structure(state.skip_state)}\n  expected: '
          f'{jax.tree.structure(skip_like)}\nCreate the state with this '
          'transform\'s init.'
      )

  def check_cross_step(self, who: str) -> None:
    """Raises for a cross-step call on a transform built for in-step use."""
    if not self.cross_step:
      raise ValueError(
          f'{who} adds to an accumulator kept between calls, but this '
          'accumulate was built with cross_step=False: its state holds none '
          'and it is for the in-step drivers only (value_and_update, the Flax '
          'and Equinox helpers). Build it with accumulate(inner, k) to call '
          'tx.update once per micro-batch.'
      )

  def init(self, params: optax.Params) -> 'AccumulateState':
    _checks.check_floating(params, 'Params')
    inner_state = self.inner.init(params)
    # zeros_like keeps a sharded parameter's sharding (explicit axes).
    acc = jax.tree.map(
        lambda p: jnp.zeros_like(p, acc_dtype(jnp.result_type(p),
                                              self.accumulator_dtype)),
        differentiated(params)) if self.cross_step else ()
    return _own_buffers(AccumulateState(
        count=jnp.zeros([], jnp.int32),
        acc=acc,
        weight=jnp.zeros([], jnp.float32),
        inner_state=inner_state,
        step=jnp.zeros([], jnp.int32),
        skipped_microbatches=jnp.zeros([], jnp.int32),
        skipped_steps=jnp.zeros([], jnp.int32),
        window_nonfinite=jnp.zeros([], jnp.bool_),
        skip_state=_nonfinite.skip_info_like(self.should_skip_update_fn,
                                             params),
        noise=(_noise.NoiseScaleState.zeros() if self.track_noise_scale
               else ()),
        norms=_norms.WindowNorms.zeros(self.track_norms),
    ), params)

  def update(self, grads: optax.Updates, state: 'AccumulateState',
             params: optax.Params | None = None, *, weight: Any = None,
             end_window: Any = None,
             **extra_args: Any) -> tuple[optax.Updates, 'AccumulateState']:
    self.check_cross_step('accumulate.update')
    self.check_state(state, params, 'accumulate.update')
    _checks.check_no_functions(extra_args, 'accumulate.update')
    _checks.check_same_structure(grads, state.acc, 'grads', 'params')
    _checks.check_floating(grads, 'Gradient')
    w = (jnp.ones([], jnp.float32) if weight is None
         else _checks.check_weight(weight))
    skip, counted = None, 1
    if self.should_skip_update_fn is not None:
      # Asked first, on the gradient as given: a skipped micro-step is
      # neither accumulated nor counted (optax.MultiSteps' semantics).
      skip, info = _nonfinite.ask(self.should_skip_update_fn, grads,
                                  state.step, params, state.skip_state)
      state = state._replace(skip_state=info)
      counted = (~skip).astype(jnp.int32)
    bad = None
    if weight is not None or self.nonfinite != 'propagate' or skip is not None:
      # Selects, not multiplies: a dropped micro-batch adds exact zeros.
      micro = _nonfinite.screen(
          self.nonfinite, Micro(None, None, grads, w, None, None),
          weighted=weight is not None, skip=skip)
      grads_in, w, bad = micro.grads, micro.weight, micro.bad
    else:
      grads_in = grads
    acc = add_weighted(state.acc, grads_in, w)
    noise = state.noise
    if _noise.tracked(noise):  # a micro-batch counts its weight, else 1
      noise = noise._replace(window=noise.window + _noise.piece(
          _noise.added_sq_norm(grads_in, state.acc, acc, w), w, w,
          prescaled=False))
    summed = _nonfinite.count_bad(
        state._replace(count=state.count + counted, acc=acc,
                       weight=state.weight + w, noise=noise), bad)
    ends = summed.count >= self.window_length(summed.step)
    if end_window is not None:
      if np.ndim(end_window) != 0:
        raise ValueError(
            'end_window must be a scalar bool, got an array of shape '
            f'{np.shape(end_window)}.'
        )
      # A window with no counted micro-step has nothing to end (as flush).
      ends = ends | (jnp.asarray(end_window, jnp.bool_) & (summed.count > 0))

    def mid(_):
      return self.zero_updates(grads, state.inner_state, params,
                               extra_args), summed

    def end(_):
      return self.finish_window(summed, grads, params, extra_args)

    def by_cond(_):
      return jax.lax.cond(ends, end, mid, None)

    def by_loop(_):
      # XLA:GPU and XLA:TPU copy what a cond branch passes through: the whole
      # state on every micro-step that does not end a window (1.91x
      # optax.MultiSteps' peak on an H100, 4096x6 MLP with adam). A
      # while_loop that runs once at a window's end, and not at all
      # otherwise, updates its carry in place.
      like = jax.eval_shape(end, None)[0]

      def once(carry):
        _, _, st = carry
        updates, st = self.finish_window(st, grads, params, extra_args)
        return jnp.zeros([], jnp.bool_), updates, cast_like(st, summed)

      # Zeros typed like the window's sum, which the updates are made from
      # (its explicit axes: an abstract `like` lacks them on a mesh with Auto
      # axes beside Explicit ones); updates shaped otherwise (lookahead's)
      # from `like`.
      if jax.tree.structure(like) == jax.tree.structure(summed.acc):
        zeros = jax.tree.map(
            lambda u, a: jnp.zeros_like(a, dtype=u.dtype)
            if np.shape(a) == u.shape else jnp.zeros_like(u), like,
            summed.acc)
      else:
        zeros = jax.tree.map(jnp.zeros_like, like)
      _, updates, new_state = jax.lax.while_loop(
          lambda carry: carry[0], once, (ends, zeros, summed))
      return updates, new_state

    return jax.lax.platform_dependent(
        None, default=by_loop,
        **{platform: by_cond for platform in COND_PLATFORMS})

  def zero_updates(self, grads_like: Any, inner_state: Any,
                   params: optax.Params | None,
                   extra_args: dict[str, Any]) -> optax.Updates:
    """Zeros with the dtypes the inner optimizer gives its updates for
    gradients like ``grads_like`` (mid-window and skipped-window updates)."""
    like = jax.eval_shape(
        lambda g, s, p: self.inner.update(g, s, p, **extra_args)[0],
        jax.tree.map(lambda g: jax.ShapeDtypeStruct(np.shape(g),
                                                    jnp.result_type(g)),
                     grads_like), inner_state, params)
    if jax.tree.structure(like) != jax.tree.structure(grads_like):
      return jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype), like)
    return jax.tree.map(lambda g, u: jnp.zeros_like(g, dtype=u.dtype),
                        grads_like, like)

  def finish_window(
      self,
      state: 'AccumulateState',
      grads_like: Any,
      params: optax.Params | None,
      extra_args: dict[str, Any],
      *,
      guard: bool = True,
      check_sum: bool = False,
  ) -> tuple[optax.Updates, 'AccumulateState']:
    """Applies the inner optimizer once to the window's mean and resets.

    ``state.acc`` and ``state.weight`` hold the window's sums; the inner
    optimizer gets their mean (with ``use_grad_mean=False``, the sum). An
    empty window (total weight 0), or one the policy skips, gives zero updates
    and leaves the inner state bit-identical: on CPU the inner update sits in
    a ``lax.cond`` branch and is not computed; on GPU and TPU it is computed
    and selected away (see below). ``guard=False`` is for callers that know
    the window is applied (every weight was 1): no guard at all.
    ``check_sum=True`` reads the finiteness of the window's gradients from
    its mean, for micro-batches screened lazily under ``'skip_step'``.
    """
    # With use_grad_mean=False the sum is divided by a 1 that depends on the
    # window's weight: like the mean's division, it keeps the inner update
    # after the loop (without it XLA held 7 MiB more temporaries, 1.4x, on a
    # 6-layer 1024-wide MLP with adam, k=8).
    mean = mean_of(state.acc, state.weight if self.use_grad_mean
                   else state.weight * 0 + 1, state.acc)
    if not guard:
      updates, inner_state = self.inner.update(
          cast_like(mean, grads_like), state.inner_state, params, **extra_args)
      return updates, reset(
          self.end_norms(self.end_noise(state, jnp.ones([], jnp.bool_)),
                         updates),
          cast_like(inner_state, state.inner_state), updates,
          keep_acc=self.cross_step)
    # Memory: XLA gives a cond's output a buffer of its own unless a branch
    # passes an operand through, and never writes a branch's operand in
    # place. So the mean is taken before the cond (in the donated
    # accumulator's buffer), the skip branch passes it through, and the
    # updates are selected after the cond: the apply branch then writes them
    # over the mean. Fresh zeros in the skip branch, or a mean taken inside
    # the apply branch, cost one parameter-sized buffer once the step applies
    # the updates. A leaf whose update is wider than the accumulator (it
    # would round through it) gets fresh zeros instead.
    like = jax.eval_shape(
        lambda m, s: self.inner.update(cast_like(m, grads_like), s, params,
                                       **extra_args)[0], mean,
        state.inner_state)
    # Updates shaped otherwise than the gradient (optax.lookahead's, for the
    # fast and slow params) get fresh zeros when skipped.
    if jax.tree.structure(mean) == jax.tree.structure(like):
      through, written = jax.tree.map(
          lambda m, u: jnp.promote_types(m.dtype, u.dtype) == m.dtype, mean,
          like), mean
    else:
      through, written = jax.tree.map(lambda u: False, like), like

    def apply(operand):
      mean, inner_state = operand
      updates, new_inner = self.inner.update(
          cast_like(mean, grads_like), inner_state, params, **extra_args)
      updates = jax.tree.map(lambda u, m, t: u.astype(m.dtype) if t else u,
                             updates, written, through)
      return updates, cast_like(new_inner, inner_state)

    def skip(operand):
      mean, inner_state = operand
      if written is like:
        return jax.tree.map(jnp.zeros_like, like), inner_state
      return jax.tree.map(
          lambda m, u, t: m if t else jnp.zeros_like(u), mean, like,
          through), inner_state

    if check_sum:
      state = _nonfinite.check_sum(state, mean)
    ok = _nonfinite.window_ok(self.nonfinite, state)
    state = self.end_noise(state, ok)

    def by_cond(operand):
      out, inner_state = jax.lax.cond(ok, apply, skip, operand)
      return jax.tree.map(lambda o: jnp.where(ok, o, jnp.zeros_like(o)),
                          out), inner_state

    def by_select(operand):
      # The updates of a window that is not applied are multiplied by 0, not
      # selected: XLA:GPU fuses the multiply into the step's apply_updates,
      # where a select held 176 MiB more on the LM benchmark. So they must be
      # finite: only a 'skip_step' window's mean can hold a non-finite value
      # (other policies drop such micro-batches, or propagate them into an
      # applied window), and it is zeroed before the inner update, from a
      # state that never saw one. (Zeroing every mean cost the same 176 MiB.)
      mean, inner_state = operand
      if self.nonfinite == 'skip_step':
        mean = jax.tree.map(lambda m: jnp.where(ok, m, jnp.zeros_like(m)),
                            mean)
      out, new_inner = apply((mean, inner_state))
      return (jax.tree.map(lambda o: o * ok.astype(o.dtype), out),
              jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                           new_inner, inner_state))

    # XLA:CPU writes the inner update in place under a cond. XLA:GPU copies
    # every operand a cond branch passes through (three parameter-sized
    # buffers with adam: 1.74x a hand-written loop's peak on an H100) and
    # XLA:TPU some of them (1.21x), while both fuse selects into the update.
    # The branch is chosen when the step is lowered for its platform.
    out, inner_state = jax.lax.platform_dependent(
        (mean, state.inner_state), default=by_select,
        **{platform: by_cond for platform in COND_PLATFORMS})
    updates = jax.tree.map(lambda o, u: o.astype(u.dtype), out, like)
    return updates, reset(self.end_norms(state, updates), inner_state,
                          updates, skipped_step=state.window_nonfinite & ~ok,
                          keep_acc=self.cross_step)

  def end_norms(self, state: 'AccumulateState',
                updates: optax.Updates) -> 'AccumulateState':
    """The state with the ended window's gradient and update norms."""
    if not self.track_norms:
      return state
    return state._replace(norms=_norms.of_window(
        self.track_norms, state.acc, state.weight, updates,
        self.use_grad_mean))

  def end_noise(self, state: 'AccumulateState',
                ok: jax.Array) -> 'AccumulateState':
    """The state with the window's noise scale estimates taken in (the
    squared norm of its mean) and the window's tally reset."""
    if not _noise.tracked(state.noise):
      return state
    return state._replace(noise=_noise.end_window(
        state.noise, state.acc, state.weight, ok, self.noise_scale_decay))


def cast_like(tree: Any, like: Any) -> Any:
  """Casts every array leaf of ``tree`` to the dtype of ``like``'s leaf."""
  return jax.tree.map(
      lambda x, y: jnp.asarray(x).astype(jnp.result_type(y))
      if hasattr(y, 'dtype') else x, tree, like)


def reset(state: AccumulateState, inner_state, updates, *,
          skipped_step: jax.Array | None = None,
          keep_acc: bool = True) -> AccumulateState:
  """A state at the start of a new window, after ``updates`` were computed.

  The zeroed accumulator is made to depend on ``updates`` through a select on
  an opaque ``False``. That orders the reset after the last read of the summed
  accumulator, so XLA writes the zeros into the donated accumulator buffer that
  the scan used as its carry, instead of holding a second parameter-sized
  buffer for the whole step (measured: 1.23x the memory of a hand-written scan
  on an MLP with fresh zeros, 1.00x with this).

  The window counter ``step`` advances by one; ``skipped_step`` (a bool)
  adds to ``skipped_steps``. With ``keep_acc=False`` (``cross_step=False``)
  the state keeps no accumulator: ``acc`` is ``()``.
  """
  acc = ()
  if keep_acc:
    # The zeros also wait for the gradient norm, the sum's other reader.
    keep, _ = jax.lax.optimization_barrier(
        (jnp.zeros([], jnp.bool_), state.norms))
    if jax.tree.structure(state.acc) != jax.tree.structure(updates):
      updates = state.acc  # updates shaped otherwise (optax.lookahead)
    acc = jax.tree.map(
        lambda a, u: jnp.where(keep, u.astype(a.dtype), jnp.zeros_like(a)),
        state.acc, updates)
  skipped_steps = jnp.asarray(state.skipped_steps, jnp.int32)
  if skipped_step is not None:
    skipped_steps = skipped_steps + skipped_step.astype(jnp.int32)
  return state._replace(
      count=jnp.zeros([], jnp.int32),
      acc=acc,
      weight=jnp.zeros([], jnp.float32),
      inner_state=inner_state,
      step=jnp.asarray(state.step, jnp.int32) + 1,
      skipped_microbatches=jnp.asarray(state.skipped_microbatches, jnp.int32),
      skipped_steps=skipped_steps,
      window_nonfinite=jnp.zeros([], jnp.bool_),
  )


_REWRITES = (
    # (state types of the wrapper, how to write it, its usual example)
    ((optax.MultiTransformState,), 'optax.multi_transform(...)',
     "optax.multi_transform({'a': optax.adamw(1e-3), 'b': optax.sgd(1e-2)}, "
     'labels)'),
    ((optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState),
     'optax.inject_hyperparams(...)(...)',
     'optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)'),
    ((tuple,), 'optax.chain(...)',
     'optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))'),
)


def nested_error(opt_state: Any, who: str) -> TypeError | None:
  """The error for an ``accumulate`` nested inside another transform.

  Inside ``optax.chain`` (or ``inject_hyperparams``, ``multi_transform``) an
  ``accumulate`` only holds back the updates; what runs before it runs on
  every micro-batch (per-micro-step clipping), and a driver that accumulated
  again would stack two windows. The fix is to accumulate the whole
  optimizer. (An accumulate inside the inner optimizer of another, for a
  longer window on some parameters, is found by neither: it is deliberate.) Returns None when ``opt_state`` holds no ``AccumulateState``.
  """
  if isinstance(opt_state, AccumulateState):
    return None
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, AccumulateState))
           if isinstance(x, AccumulateState)]
  if not found:
    return None
  wrapper, example = next(
      ((w, e) for types, w, e in _REWRITES if isinstance(opt_state, types)),
      (f'{type(opt_state).__name__}(...)', 'your_optimizer'))
  return TypeError(
      f'{who}: the optimizer is an {wrapper} that contains an '
      'accum_jax.accumulate. Nested there, the transforms around it would run '
      'on every micro-batch instead of once per window, and accumulating '
      f'again would stack two windows. Accumulate the whole optimizer: '
      f'accum_jax.accumulate({wrapper}, k), e.g. '
      f'accum_jax.accumulate({example}, k).'
  )


def accumulate(
    inner: optax.GradientTransformation,
    num_microbatches: int | Callable[[jax.Array], Any],
    *,
    accumulator_dtype: Any | None = jnp.float32,
    nonfinite: str = 'propagate',
    use_grad_mean: bool = True,
    should_skip_update_fn: Callable[..., Any] | None = None,
    track_noise_scale: bool = False,
    noise_scale_decay: float = 0.99,
    cross_step: bool = True,
    track_norms: bool | Sequence[str] = False,
) -> AccumulateTransformation:
  r"""Accumulates gradients over ``k`` micro-steps, then applies ``inner`` once.

  Each call adds ``weight * grads`` to an accumulator. On the ``k``-th call of
  a window the inner optimizer is applied **once** to the weighted mean

  .. math::
    \bar g = \sum_j w_j g_j \,/\, \sum_j w_j,

  cast back to the gradients' dtype, and the window starts again. The updates
  have the dtypes the inner optimizer gives them for such gradients, as
  ``optax.MultiSteps``' do. On the other calls the updates are zeros (of the
  same structure and dtypes) and the inner
  state is left bit-identical: the inner update sits in a ``lax.cond`` branch
  and is not computed. So clipping, weight decay, the step count and any
  learning-rate schedule of ``inner`` see one step per window.

  With the default weight of 1 the mean is the plain average of the ``k``
  gradients, which is the full-batch gradient of a mean loss when the
  micro-batches have equal sizes. Pass ``weight=`` (e.g. the number of
  non-padding tokens of the micro-batch, with ``grads`` the gradient of the
  token-mean loss of that micro-batch) to get the exact token-mean gradient of
  the whole window. A window whose weights sum to 0 gives zero updates and
  leaves the inner state untouched, never NaN.

  Extra keyword arguments of ``update`` (e.g. ``value=`` for
  ``optax.contrib.reduce_on_plateau``) are forwarded to ``inner`` at the window
  end; a plain ``GradientTransformation`` ignores them.

  Use it cross-step (one jitted ``update`` per micro-batch, like
  ``optax.MultiSteps``) or in-step with :func:`accum_jax.value_and_update`,
  which runs the whole window in one ``lax.scan``.

  Cross-step, ``update(grads, state, params, weight=w, end_window=e)`` also
  takes ``end_window``, a (traceable) bool that ends the window after this
  micro-step whatever its length, normalised by the weight seen; see also
  :func:`accum_jax.flush`. A negative ``weight`` raises when it is concrete
  and counts as 0 when traced. A micro-batch of weight 0 adds ``0 * grads``
  (exact zeros unless the gradient is non-finite; the skip policies drop it
  whatever its gradient).

  Non-finite values (``nonfinite=``): ``'propagate'`` does plain arithmetic,
  so a NaN/Inf gradient reaches the update (in-step on GPU and TPU, even that
  of a window whose weights sum to 0, whose update is otherwise zeros: the
  not-applied update is multiplied by 0 there, see ``docs/architecture.md``;
  use a skip policy to drop such values). ``'skip_microbatch'`` drops a
  micro-batch with a non-finite gradient, weight (or, in-step, loss) and its
  weight: the mean is over the finite micro-batches only, and a window with
  none is not applied. ``'skip_step'`` applies no update for a window that saw
  any non-finite micro-batch and leaves the inner state bit-identical. Both
  use selects, never ``0 * inf``, and count what they drop in
  ``state.skipped_microbatches`` and ``state.skipped_steps``.

  ``should_skip_update_fn`` is ``optax.MultiSteps``' predicate, e.g.
  ``optax.skip_not_finite`` or ``functools.partial(optax.skip_large_updates,
  max_squared_norm=...)``: ``fn(grads, state.step, params)`` returns
  ``(should_skip, info)``. It is asked first, on each micro-step's gradient
  as given; a skipped micro-step is neither accumulated nor counted (cross-
  step, the window then lasts until ``k`` micro-steps were kept; in-step,
  the window's mean is over the kept micro-batches) and the ``nonfinite``
  policy only sees the micro-steps it keeps. ``info`` is kept in
  ``state.skip_state`` (last micro-step's). In-step it runs inside the loop,
  once per micro-batch, on one device only (a mesh raises: no device holds
  a whole micro-batch gradient there).

  Args:
    inner: the optimizer to apply once per window.
    num_microbatches: ``k``, the number of micro-steps in a window (an int >=
      1), or cross-step only, a schedule ``f(step) -> int`` of the number of
      windows ended so far (``state.step``), like ``every_k_schedule`` of
      ``optax.MultiSteps``; values below 1 count as 1.
    accumulator_dtype: dtype of the accumulator. Gradients are accumulated in
      ``promote_types(grad_dtype, accumulator_dtype)``, so bf16/fp16 gradients
      accumulate in float32 by default and float64 stays float64. ``None``
      accumulates in the gradients' own dtype.
    nonfinite: ``'propagate'`` (default), ``'skip_microbatch'`` or
      ``'skip_step'``, see above.
    use_grad_mean: ``True`` (default) applies ``inner`` to the window's
      weighted mean; ``False`` to the weighted sum :math:`\sum_j w_j g_j`
      (``optax.MultiSteps(use_grad_mean=False)``), in both modes.
    should_skip_update_fn: a skip predicate ``fn(updates, gradient_step,
      params) -> (should_skip, info)``, see above; None asks nothing.
    track_noise_scale: estimate the gradient noise scale from each window's
      micro-batch gradients (a few scalars in the state, no parameter-sized
      buffer); read it with :func:`accum_jax.noise_scale`. See
      ``docs/noise_scale.md``.
    noise_scale_decay: the decay in ``[0, 1)`` of the estimator's EMAs over
      windows (bias-corrected).
    cross_step: ``True`` (default): the state keeps the accumulator between
      calls, so ``tx.update`` can be called once per micro-batch and an
      in-step window can start from a part-full one. ``False``: for the
      in-step drivers only (:func:`accum_jax.value_and_update`, the Flax and
      Equinox helpers); the state holds no accumulator (``acc`` is ``()``),
      so it holds no parameter-sized buffer beyond the inner optimizer's, and
      each step sums its gradients in a buffer of its own, as a hand-written
      loop does. That buffer exists only during the step, which lowers the
      peak where an accumulator at rest raises it: ``k=1``, and a data
      parallel mesh on XLA:GPU (see ``docs/architecture.md``).
      ``tx.update`` and :func:`accum_jax.flush` then raise.
    track_norms: keep the global norms of each window's mean gradient
      (``'grad'``: MaxText's ``raw_grad_norm``, the Hugging Face Trainer's
      ``grad_norm``) and of its updates (``'update'``) in the state, read by
      :func:`accum_jax.window_norms`: ``True`` for both, or a tuple of the
      names. The gradient's norm is read from the accumulated sum, which
      the step holds anyway; the update's needs the updates in a buffer of
      their own where ``apply_updates`` would fuse them away (one
      parameter-sized buffer; see ``docs/robustness.md``).

  Returns:
    An :class:`AccumulateTransformation` (an
    ``optax.GradientTransformationExtraArgs``) with state
    :class:`AccumulateState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import accum_jax
    >>> tx = accum_jax.accumulate(optax.sgd(1.0), num_microbatches=2)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.array([1.0, 2.0])}, state, params)
    >>> updates['w']  # mid-window: zeros
    Array([0., 0.], dtype=float32)
    >>> updates, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)
    >>> updates['w']  # window end: -lr * mean of the two gradients
    Array([-2., -3.], dtype=float32)
    >>> int(state.count)
    0
  """
  if not callable(num_microbatches):
    num_microbatches = _checks.check_num_microbatches(num_microbatches)
  nonfinite = _nonfinite.check_policy(nonfinite)
  accumulator_dtype = _checks.check_accumulator_dtype(accumulator_dtype)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        'accumulate expects an optax.GradientTransformation as inner, got '
        f'{type(inner).__name__}.'
    )
  if not isinstance(use_grad_mean, (bool, np.bool_)):
    raise TypeError(f'use_grad_mean must be a bool, got {use_grad_mean!r}.')
  if should_skip_update_fn is not None and not callable(should_skip_update_fn):
    raise TypeError(
        'should_skip_update_fn must be a function (updates, gradient_step, '
        f'params) -> (should_skip, info), got {should_skip_update_fn!r}.'
    )
  if not isinstance(cross_step, bool):
    raise TypeError(f'cross_step must be a bool, got {cross_step!r}.')
  if not isinstance(track_noise_scale, bool):
    raise TypeError(
        f'track_noise_scale must be a bool, got {track_noise_scale!r}.')
  track_norms = _norms.check(track_norms)
  config = AccumulateConfig(
      optax.with_extra_args_support(inner), num_microbatches,
      accumulator_dtype, nonfinite, use_grad_mean=bool(use_grad_mean),
      should_skip_update_fn=should_skip_update_fn,
      track_noise_scale=track_noise_scale,
      noise_scale_decay=_noise.check_decay(noise_scale_decay),
      cross_step=cross_step, track_norms=track_norms)
  return AccumulateTransformation(config.init, config.update)


def flush(
    tx: Any,
    state: Any,
    params: optax.Params | None = None,
    **extra_args: Any,
) -> tuple[optax.Updates, Any]:
  """Ends the current window now (e.g. at the end of an epoch).

  Applies the inner optimizer once to the mean of the micro-batches seen so
  far, divided by their weight, not by ``k``, and starts a new window. On an
  empty window (``count == 0``) it returns zero updates and the state
  unchanged. The same non-finite policy applies as at a normal window end.

  Args:
    tx: a transform made by :func:`accum_jax.accumulate`.
    state: its state, mid-window.
    params: the params, passed to the inner optimizer; the updates take their
      dtypes (else the accumulator's).
    **extra_args: forwarded to the inner optimizer, as in ``tx.update``.

  Returns:
    ``(updates, state)``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import accum_jax
    >>> tx = accum_jax.accumulate(optax.sgd(1.0), num_microbatches=4)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(jnp.array([1.0, 2.0]), state, params)
    >>> _, state = tx.update(jnp.array([3.0, 4.0]), state, params)
    >>> updates, state = accum_jax.flush(tx, state, params)
    >>> updates  # the mean of 2 gradients, not their sum / 4
    Array([-2., -3.], dtype=float32)
    >>> int(state.count), int(state.step)
    (0, 1)
  """
  if not isinstance(tx, AccumulateTransformation):
    raise TypeError(
        'flush needs a transform made by accum_jax.accumulate, got '
        f'{type(tx).__name__}.'
    )
  tx.config.check_cross_step('flush')
  tx.config.check_state(state, params, 'flush')
  like = params if params is not None else state.acc

  def end(_):
    return tx.config.finish_window(state, like, params, extra_args)

  def keep(_):
    return tx.config.zero_updates(like, state.inner_state, params,
                                  extra_args), state

  return jax.lax.cond(state.count > 0, end, keep, None)
