"""Reading an ``accumulate`` state: window ends, norms and the noise scale.

Each reader takes an :class:`AccumulateState`, or any pytree holding exactly
one (an ``optax.chain`` state, a Flax ``TrainState``), and returns traceable
scalars; none of them changes the state.
"""

from typing import Any

import jax
import jax.numpy as jnp

from accum_jax import _noise, _norms
from accum_jax._accumulate import AccumulateState


def find_states(state: Any) -> list[AccumulateState]:
  """Every ``AccumulateState`` in ``state``: itself, or those nested in it
  (an ``optax.chain`` state, a Flax ``TrainState``)."""
  return [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, AccumulateState))
          if isinstance(x, AccumulateState)]


def has_updated(state: Any) -> jax.Array:
  """Whether the last call ended a window (``optax.MultiSteps.has_updated``).

  True when the state is at a window boundary after at least one window:
  ``count == 0 and step > 0``. After a ``value_and_update`` step it is always
  True; cross-step it is True after the call that ended a window. As in
  ``optax.MultiSteps``, it is read from the counters, so it also holds after
  a call that left a window boundary unchanged (a micro-step skipped by
  ``should_skip_update_fn`` right after a window end, ``flush`` of an empty
  window), and a window that ended without an inner update (an empty or
  ``'skip_step'`` window, counted in ``skipped_steps``) counts as ended.

  Args:
    state: an :class:`AccumulateState`, or an optimizer state holding exactly
      one (e.g. an ``optax.chain`` state with an ``accumulate`` in it).

  Returns:
    A bool scalar array (traceable).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import accum_jax
    >>> tx = accum_jax.accumulate(optax.sgd(1.0), num_microbatches=2)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(jnp.ones(2), state, params)
    >>> bool(accum_jax.has_updated(state))
    False
    >>> _, state = tx.update(jnp.ones(2), state, params)
    >>> bool(accum_jax.has_updated(state))
    True
  """
  found = find_states(state)
  if len(found) != 1:
    raise TypeError(
        'has_updated needs an AccumulateState, or an optimizer state holding '
        f'exactly one; got a {type(state).__name__} holding {len(found)}.'
    )
  state = found[0]
  return (jnp.asarray(state.count) == 0) & (jnp.asarray(state.step) > 0)


def window_norms(state: Any) -> _norms.WindowNorms:
  """The global norms of the last ended window's mean gradient and updates.

  What trainers log as the gradient norm (MaxText's ``raw_grad_norm``, the
  Hugging Face Trainer's ``grad_norm``): the norm of the gradient the inner
  optimizer stepped on, the window's weighted mean over all its
  micro-batches (before any clipping in the inner optimizer), and the norm
  of the updates returned for it. Both are scalars kept in the state when a
  window ends, in-step (:func:`value_and_update`, the Flax and Equinox
  helpers) and cross-step (the call that ends the window; the calls within
  a window keep the last window's), at no parameter-sized cost.

  Args:
    state: an :class:`AccumulateState`, or an optimizer state holding exactly
      one (an ``optax.chain`` state, a Flax ``TrainState``'s ``opt_state``).

  Returns:
    A :class:`WindowNorms` of float32 scalars (traceable).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import accum_jax
    >>> loss_fn = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> w, x = jnp.ones(3), jnp.arange(24.0).reshape(8, 3) / 24
    >>> tx = accum_jax.accumulate(optax.sgd(0.1), 4, track_norms=True)
    >>> _, updates, state = accum_jax.value_and_update(loss_fn, tx)(
    ...     w, tx.init(w), x)
    >>> norms = accum_jax.window_norms(state)
    >>> full = optax.tree.norm(jax.grad(loss_fn)(w, x))
    >>> bool(jnp.allclose(norms.grad, full)), bool(jnp.allclose(
    ...     norms.update, 0.1 * full))
    (True, True)
  """
  found = find_states(state)
  if len(found) != 1:
    raise TypeError(
        'window_norms needs an AccumulateState, or an optimizer state holding '
        f'exactly one; got a {type(state).__name__} holding {len(found)}.')
  if not isinstance(found[0].norms, _norms.WindowNorms):
    raise ValueError(
        'This AccumulateState keeps no window norms: build the transform '
        "with accumulate(..., track_norms=True) (or ('grad',) for the "
        "gradient's alone) and create the state with its init.")
  return found[0].norms


def _find_state(state: Any) -> Any:
  """The ``AccumulateState`` in ``state`` (itself, or one nested in e.g. a
  Flax ``TrainState``)."""
  found = find_states(state)
  if len(found) != 1:
    raise TypeError(
        'noise_scale expects the AccumulateState of an accum_jax.accumulate '
        "transform (or a pytree holding exactly one, e.g. a Flax TrainState; "
        "for an nnx.Optimizer pass nnx.as_pure(optimizer.opt_state)), got "
        f'{type(state).__name__} holding {len(found)}.'
    )
  return found[0]


def noise_scale(state: Any) -> _noise.NoiseScale:
  r"""The gradient noise scale estimated so far (McCandlish et al. 2018).

  Needs a transform built with ``accumulate(..., track_noise_scale=True)``.
  Each window contributes the unbiased estimates of :math:`|G|^2` (the true
  gradient's squared norm) and :math:`S = \mathrm{tr}\,\Sigma` (the per-example
  gradient covariance's trace) from its pieces' squared norms and its mean's;
  each is smoothed over windows with a bias-corrected EMA
  (``noise_scale_decay``) and ``b_simple = S / |G|^2``. Sizes are in
  examples: a micro-batch's weight when one is given (``weight_fn`` in-step,
  ``weight=`` cross-step, e.g. tokens), else its rows in-step and 1
  cross-step. See ``docs/noise_scale.md``.

  Args:
    state: an ``AccumulateState``, or a pytree holding exactly one (a Flax
      ``TrainState``; for an ``nnx.Optimizer``, ``nnx.as_pure(
      optimizer.opt_state)``).

  Returns:
    A :class:`NoiseScale` of scalar arrays (NaN before the first estimate).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import accum_jax
    >>> def loss_fn(w, batch):
    ...   return 0.5 * jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> tx = accum_jax.accumulate(optax.sgd(0.1), 4, track_noise_scale=True)
    >>> step = jax.jit(accum_jax.value_and_update(loss_fn, tx))
    >>> w = jnp.zeros(3)
    >>> opt_state = tx.init(w)
    >>> kx, ky = jax.random.split(jax.random.key(0))
    >>> batch = {'x': jax.random.normal(kx, (32, 3)),
    ...          'y': jax.random.normal(ky, (32,))}
    >>> _, _, opt_state = step(w, opt_state, batch)
    >>> est = accum_jax.noise_scale(opt_state)
    >>> int(est.windows), float(est.batch_size)
    (1, 32.0)
  """
  noise = _find_state(state).noise
  if not _noise.tracked(noise):
    raise ValueError(
        'This AccumulateState does not track the noise scale: build the '
        'transform with accum_jax.accumulate(..., track_noise_scale=True).'
    )
  return _noise.estimate(noise)
