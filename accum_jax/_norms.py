"""The window's gradient and update norms, the figures every trainer logs.

MaxText's ``raw_grad_norm``, the Hugging Face Trainer's ``grad_norm`` and
big_vision's ``l2_grads`` are the global norm of the gradient the optimizer
steps on: here the window's weighted mean, which the in-step drivers never
return. With ``accumulate(..., track_norms=...)`` the norms are scalars kept
in the state, taken when a window ends: the gradient's from the accumulated
sum (a buffer the step holds anyway, divided by the window's weight), the
update's from the updates returned (which XLA:CPU then holds in a buffer of
their own instead of fusing them into ``apply_updates``).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

NAMES = ('grad', 'update')


class WindowNorms(NamedTuple):
  """Global L2 norms of the last window that ended.

  Attributes:
    grad: float32 scalar, the norm of the window's mean gradient (with
      ``use_grad_mean=False``, of its weighted sum): what the inner
      optimizer was given, before its clipping; 0 for an empty window; for
      a window skipped for a non-finite gradient, the norm of what it
      summed (non-finite in-step, where ``'skip_step'`` sums every
      micro-batch). ``()`` when not tracked.
    update: float32 scalar, the norm of the updates returned for the window
      (0 when it was skipped). ``()`` when not tracked.
  """

  grad: Any = ()
  update: Any = ()

  @classmethod
  def zeros(cls, names: tuple[str, ...]) -> 'WindowNorms | tuple':
    """The norms before any window ended; ``()`` when none is tracked."""
    if not names:
      return ()
    return cls(**{n: jnp.zeros([], jnp.float32) for n in names})


def check(track_norms: Any) -> tuple[str, ...]:
  """``accumulate``'s ``track_norms`` as a tuple of names."""
  if track_norms is True:
    return NAMES
  if track_norms is False or track_norms is None:
    return ()
  names = (track_norms,) if isinstance(track_norms, str) else tuple(
      track_norms)
  bad = [n for n in names if n not in NAMES]
  if bad:
    raise ValueError(f'track_norms must be a bool or some of {NAMES}, got '
                     f'{track_norms!r}.')
  return tuple(n for n in NAMES if n in names)


def kept(norms: Any) -> tuple[str, ...]:
  """The names a state's norms keep."""
  if not isinstance(norms, WindowNorms):
    return ()
  return tuple(n for n in NAMES if not isinstance(getattr(norms, n), tuple))


def norm(tree: Any) -> jax.Array:
  """The global L2 norm of ``tree``, in float32."""
  return optax.tree.norm(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))


def of_window(names: tuple[str, ...], acc: Any, weight: jax.Array,
              updates: Any, use_mean: bool) -> WindowNorms:
  """The norms ``names`` of a window whose gradient sum is ``acc`` (total
  weight ``weight``) and whose updates are ``updates``."""
  norms = {}
  if 'grad' in names:
    grad = norm(acc)
    if use_mean:
      safe = jnp.where(weight > 0, weight, 1.0)
      grad = jnp.where(weight > 0, grad / safe, 0.0)
    norms['grad'] = grad.astype(jnp.float32)
  if 'update' in names:
    norms['update'] = norm(updates)
  return WindowNorms(**norms)
