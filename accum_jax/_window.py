"""Window lengths: ``k`` schedules, windows ended early, ragged batches.

Cross-step, a window ends after ``num_microbatches`` micro-steps, where that
may be a schedule of the number of windows ended so far, or earlier when
``update(..., end_window=True)`` or :func:`accum_jax.flush` says so. In-step,
a batch may carry fewer real micro-batches than ``k``
(``num_real_microbatches=r``): the
trailing ``k - r`` are padding with weight 0, and since ``r`` is traced one
compiled step serves every ``r``. Either way the window's mean is divided by
the weight it saw, never by ``k``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from accum_jax import _split

NUM_REAL_KWARG = 'num_real_microbatches'


def check_num_microbatches(num_microbatches: Any) -> Any:
  """An int ``k >= 1``, or a schedule (a callable), else a clear error."""
  if callable(num_microbatches):
    return num_microbatches
  return _split.check_num_microbatches(num_microbatches)


def window_length(num_microbatches: Any, step: jax.Array) -> Any:
  """``k`` for the window after ``step`` ended windows (at least 1)."""
  if not callable(num_microbatches):
    return num_microbatches
  length = num_microbatches(jnp.asarray(step, jnp.int32))
  if jnp.ndim(length) != 0 or not jnp.issubdtype(jnp.result_type(length),
                                                  jnp.integer):
    raise TypeError(
        'A num_microbatches schedule must return an integer scalar, got '
        f'shape {jnp.shape(length)} and dtype {jnp.result_type(length)}.'
    )
  return jnp.maximum(jnp.asarray(length, jnp.int32), 1)


def static_num_microbatches(tx: Any, who: str) -> int:
  """``tx.num_microbatches`` for a driver that needs a static ``k``."""
  if callable(tx.num_microbatches):
    raise TypeError(
        f'{who} runs a fixed number of micro-batches per step, but tx was '
        'built with a num_microbatches schedule. Use accumulate(inner, k) with '
        'an int k for the in-step drivers (rebuild the step, or pass '
        'num_real_microbatches=, to change k in-step); schedules are for '
        'cross-step tx.update calls.'
    )
  return tx.num_microbatches


def check_end_window(end_window: Any) -> jax.Array:
  if jnp.ndim(end_window) != 0:
    raise ValueError(
        'end_window must be a scalar bool, got an array of shape '
        f'{jnp.shape(end_window)}.'
    )
  return jnp.asarray(end_window, jnp.bool_)


def pop_num_real(kwargs: dict[str, Any],
                 num_microbatches: int) -> tuple[jax.Array | None, dict]:
  """Takes ``num_real_microbatches`` out of a driver's keyword arguments."""
  if NUM_REAL_KWARG not in kwargs:
    return None, kwargs
  kwargs = dict(kwargs)
  r = kwargs.pop(NUM_REAL_KWARG)
  if jnp.ndim(r) != 0 or not jnp.issubdtype(jnp.result_type(r), jnp.integer):
    raise TypeError(
        f'{NUM_REAL_KWARG} must be an integer scalar, got shape '
        f'{jnp.shape(r)} and dtype {jnp.result_type(r)}.'
    )
  if not isinstance(r, jax.core.Tracer):
    value = int(np.asarray(r))
    if not 0 <= value <= num_microbatches:
      raise ValueError(
          f'{NUM_REAL_KWARG} must be in [0, {num_microbatches}] '
          f'(num_microbatches), got {value}.'
      )
  return jnp.asarray(r, jnp.int32), kwargs
