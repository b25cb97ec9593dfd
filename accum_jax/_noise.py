r"""The gradient noise scale, estimated from the micro-batches of each window.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training",
appendix A: with :math:`G` the true gradient and :math:`\Sigma` the
per-example gradient covariance, a gradient averaged over :math:`b` examples
has :math:`E|g|^2 = |G|^2 + \mathrm{tr}\,\Sigma / b`. A window holds ``n``
pieces (micro-batches; on a mesh each device's share of one) of ``b_p``
examples each, ``B = sum_p b_p``. Its mean of the pieces' squared norms
weighted by size and the squared norm of its mean,

.. math::
  |G_s|^2 = \sum_p \frac{b_p}{B} |g_p|^2, \qquad
  |G_b|^2 = \Big|\sum_p \frac{b_p}{B} g_p\Big|^2,

have :math:`E|G_s|^2 = |G|^2 + \mathrm{tr}\,\Sigma / B_s` with
:math:`B_s = B / n` (whatever the sizes) and :math:`E|G_b|^2 = |G|^2 +
\mathrm{tr}\,\Sigma / B`, so

.. math::
  |G|^2 \approx \frac{n |G_b|^2 - |G_s|^2}{n - 1}, \qquad
  S = \mathrm{tr}\,\Sigma \approx \frac{B (|G_s|^2 - |G_b|^2)}{n - 1}

are unbiased; each is smoothed over windows with a bias-corrected EMA and
:math:`b_\mathrm{simple} = S / |G|^2`. See ``docs/noise_scale.md``.

The loop adds each piece's :class:`Tally` (three scalars) to its sums; the
window end adds :math:`|G_b|^2`. Nothing parameter-sized is kept, and each
gradient is read once (:func:`added_sq_norm`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Tally(NamedTuple):
  """What the pieces of a window add up (float32 scalars).

  Attributes:
    sq_norm: ``sum_p b_p |g_p|^2``.
    examples: ``sum_p b_p``, the window's size ``B`` in examples.
    pieces: ``n``, the pieces of non-zero size.
  """

  sq_norm: jax.Array
  examples: jax.Array
  pieces: jax.Array

  @classmethod
  def zeros(cls) -> 'Tally':
    return cls(*(jnp.zeros([], jnp.float32) for _ in range(3)))

  def __add__(self, other: 'Tally') -> 'Tally':  # type: ignore[override]
    return Tally(*(a + b for a, b in zip(self, other, strict=True)))


class NoiseScaleState(NamedTuple):
  """The estimator's part of an ``AccumulateState`` (scalars only).

  Attributes:
    window: the current window's :class:`Tally`.
    grad_sq: the EMA of the windows' :math:`|G|^2` estimates (not
      bias-corrected).
    trace_cov: the EMA of the windows' :math:`S` estimates (not
      bias-corrected).
    ema_weight: ``1 - decay ** windows``, the bias correction.
    windows: int32, the windows that gave an estimate.
    batch_size: float32, ``B`` of the last such window, in examples.
  """

  window: Tally
  grad_sq: jax.Array
  trace_cov: jax.Array
  ema_weight: jax.Array
  windows: jax.Array
  batch_size: jax.Array

  @classmethod
  def zeros(cls) -> 'NoiseScaleState':
    # One array per field: a state whose leaves share a buffer cannot be
    # donated ("Attempt to donate the same buffer twice").
    def zero():
      return jnp.zeros([], jnp.float32)

    return cls(Tally.zeros(), zero(), zero(), zero(),
               jnp.zeros([], jnp.int32), zero())


class NoiseScale(NamedTuple):
  """The gradient noise scale, as read by :func:`accum_jax.noise_scale`.

  Every field is a scalar array, NaN until a window has given an estimate.

  Attributes:
    b_simple: the simple noise scale ``trace_cov / grad_sq``, in examples:
      roughly the batch size above which a larger batch stops cutting the
      steps to a given loss.
    trace_cov: ``S``, the trace of the per-example gradient covariance.
    grad_sq: ``|G|^2``, the squared norm of the true gradient.
    windows: int32, the windows averaged so far.
    batch_size: ``B`` of the last window, in examples.
  """

  b_simple: jax.Array
  trace_cov: jax.Array
  grad_sq: jax.Array
  windows: jax.Array
  batch_size: jax.Array


def sq_norm(tree: Any) -> jax.Array:
  """``sum`` of every leaf's squared entries, in float32 (or wider)."""
  total = jnp.zeros([], jnp.float32)
  for x in jax.tree.leaves(tree):
    wide = jnp.promote_types(jnp.result_type(x), jnp.float32)
    total = total + jnp.sum(jnp.square(jnp.asarray(x).astype(wide))).astype(
        jnp.float32)
  return total


# Where the squared norm is read from the add's increment (see added_sq_norm).
INCREMENT_PLATFORMS = ('cuda', 'rocm')


def added_sq_norm(grads: Any, before: Any, after: Any,
                  scale: jax.Array) -> jax.Array:
  """``|grads|^2`` (float32) of a gradient the sum took in: ``after = before
  + scale * grads``.

  XLA:GPU adds a gradient into the carry inside the matmul that makes it. A
  norm of ``grads`` needs the gradient in a buffer of its own, which the add
  and the norm then read in two kernels. Read as ``sum(grads * (after -
  before)) / scale`` it joins the add's kernel: the gradient is read once.
  XLA:CPU copies the carry for that form (1.20x the peak) and XLA:TPU gains
  nothing from it, so elsewhere the norm is ``grads``' own. The two agree to
  rounding (``after - before`` rounds to the sum's magnitude).
  """

  def from_increment():
    total = jnp.zeros([], jnp.float32)
    for g, b, a in zip(jax.tree.leaves(grads), jax.tree.leaves(before),
                       jax.tree.leaves(after), strict=True):
      wide = jnp.promote_types(jnp.result_type(a), jnp.float32)
      total = total + jnp.sum(g.astype(wide) * (a.astype(wide)
                                                - b.astype(wide))).astype(
                                                    jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    return total / jnp.where(s != 0, s, 1.0)

  return jax.lax.platform_dependent(
      default=lambda: sq_norm(grads),
      **{platform: from_increment for platform in INCREMENT_PLATFORMS})


def piece(sq: jax.Array, weight: jax.Array, examples: Any,
          prescaled: bool) -> Tally:
  """One piece's :class:`Tally`.

  Args:
    sq: the squared norm of its gradient as accumulated
      (:func:`added_sq_norm`): of ``weight * gradient`` when ``prescaled``.
    weight: its weight as accumulated (0: dropped or empty, not counted).
    examples: its size ``b`` in examples (the weight, or its rows).
    prescaled: whether the gradient carried the weight: ``|g|^2 = |w g|^2 /
      w^2``.
  """
  w = jnp.asarray(weight, jnp.float32)
  keep = w > 0
  if prescaled:
    sq = sq / jnp.where(keep, w * w, 1.0)
  b = jnp.where(keep, jnp.asarray(examples, jnp.float32), 0.0)
  # A select: a dropped piece's gradient may be non-finite.
  return Tally(jnp.where(keep, b * sq, 0.0), b, keep.astype(jnp.float32))


def end_window(state: NoiseScaleState, acc: Any, weight: jax.Array,
               ok: jax.Array, decay: float) -> NoiseScaleState:
  """``state`` after a window whose weighted gradient sum is ``acc`` and
  weight sum ``weight``: its estimates enter the EMAs when the window was
  applied (``ok``), has two pieces or more and its estimates are finite; the
  window's tally is reset."""
  n, big = state.window.pieces, state.window.examples
  safe_big = jnp.where(big > 0, big, 1.0)
  small_sq = state.window.sq_norm / safe_big
  # |mean|^2 from the sum, not the mean: a read of the mean (which is taken
  # in the accumulator's buffer) kept a parameter-sized copy of it.
  w = jnp.asarray(weight, jnp.float32)
  safe_w = jnp.where(w > 0, w, 1.0)
  big_sq = sq_norm(acc) / (safe_w * safe_w)
  safe_n = jnp.where(n > 1, n - 1, 1.0)
  grad_sq = (n * big_sq - small_sq) / safe_n
  trace_cov = big * (small_sq - big_sq) / safe_n
  use = (ok & (n > 1) & jnp.isfinite(grad_sq) & jnp.isfinite(trace_cov))
  d = jnp.float32(decay)

  def ema(old, new):
    return jnp.where(use, d * old + (1 - d) * new, old)

  return NoiseScaleState(
      window=Tally.zeros(),
      grad_sq=ema(state.grad_sq, grad_sq),
      trace_cov=ema(state.trace_cov, trace_cov),
      ema_weight=ema(state.ema_weight, jnp.ones([], jnp.float32)),
      windows=state.windows + use.astype(jnp.int32),
      batch_size=jnp.where(use, big, state.batch_size),
  )


def tracked(noise: Any) -> bool:
  """Whether an ``AccumulateState.noise`` holds the estimator (else ``()``)."""
  return isinstance(noise, NoiseScaleState)


def check_decay(decay: Any) -> float:
  if (isinstance(decay, bool) or not isinstance(decay, (int, float, np.number))
      or not 0 <= float(decay) < 1):
    raise ValueError(
        f'noise_scale_decay must be a number in [0, 1), got {decay!r}.')
  return float(decay)


def estimate(noise: NoiseScaleState) -> NoiseScale:
  """The :class:`NoiseScale` of a tracked state's EMAs (NaN before the
  first estimate)."""
  w = noise.ema_weight
  have = w > 0
  safe = jnp.where(have, w, 1.0)
  nan = jnp.full([], jnp.nan, jnp.float32)
  grad_sq = jnp.where(have, noise.grad_sq / safe, nan)
  trace_cov = jnp.where(have, noise.trace_cov / safe, nan)
  return NoiseScale(b_simple=trace_cov / grad_sq, trace_cov=trace_cov,
                    grad_sq=grad_sq, windows=noise.windows,
                    batch_size=jnp.where(have, noise.batch_size, nan))


def adaptive_num_microbatches(
    estimate: NoiseScale,
    examples_per_microbatch: Any,
    max_microbatches: int,
    *,
    min_microbatches: int = 1,
    warmup_windows: int = 10,
    warmup_microbatches: int | None = None,
) -> jax.Array:
  """The number of micro-batches for the next step, from the noise scale.

  ``ceil(b_simple / examples_per_microbatch)`` clipped to ``[min_microbatches,
  max_microbatches]``: the batch grows with the noise scale. Pass it as
  ``num_real_microbatches=`` to a step compiled for ``max_microbatches``:
  padding micro-batches are not computed, so one compiled step runs every
  batch size. Until ``warmup_windows`` windows have given an estimate it
  returns ``warmup_microbatches`` (default ``max_microbatches``). A
  non-positive or non-finite ``grad_sq`` (noise dominates) gives the maximum,
  a non-positive ``trace_cov`` the minimum.

  On one device a window of one micro-batch gives no estimate (it has a
  single piece), so the estimate then stays where it was: use
  ``min_microbatches=2`` there to keep it tracking.

  Args:
    estimate: :func:`accum_jax.noise_scale`'s result.
    examples_per_microbatch: the examples (rows, or the weight unit, e.g.
      tokens) of one micro-batch.
    max_microbatches: the step's ``k``.
    min_microbatches: the fewest micro-batches to run.
    warmup_windows: windows to wait for before following the estimate.
    warmup_microbatches: the micro-batches during the warm-up.

  Returns:
    An int32 scalar array (traceable: it can be computed inside the step).

  Examples:
    >>> import jax.numpy as jnp
    >>> import accum_jax
    >>> est = accum_jax.NoiseScale(b_simple=jnp.float32(100.0),
    ...     trace_cov=jnp.float32(50.0), grad_sq=jnp.float32(0.5),
    ...     windows=jnp.int32(20), batch_size=jnp.float32(256.0))
    >>> int(accum_jax.adaptive_num_microbatches(est, 32, 8))
    4
  """
  if warmup_microbatches is None:
    warmup_microbatches = max_microbatches
  if not 1 <= min_microbatches <= max_microbatches:
    raise ValueError(
        f'Need 1 <= min_microbatches <= max_microbatches, got '
        f'{min_microbatches} and {max_microbatches}.'
    )
  wanted = jnp.ceil(estimate.b_simple / jnp.asarray(examples_per_microbatch,
                                                    jnp.float32))
  wanted = jnp.where(jnp.isfinite(wanted), wanted, max_microbatches)
  wanted = jnp.where(~(estimate.grad_sq > 0), max_microbatches, wanted)
  wanted = jnp.where(estimate.trace_cov <= 0, min_microbatches, wanted)
  k = jnp.clip(wanted, min_microbatches, max_microbatches).astype(jnp.int32)
  return jnp.where(estimate.windows < warmup_windows,
                   jnp.int32(warmup_microbatches), k)
