"""A static record of how an :class:`AccumulateState` was made.

The record is a leafless pytree node, so it lives in the state's tree
structure: jit treats it as static, checkpoints store nothing for it, and a
state from a different ``accumulate`` (another ``k`` or policy) is caught at
trace time instead of silently ending its windows at the wrong count.
"""

from typing import Any

import jax


@jax.tree_util.register_static
class Config:
  """``num_microbatches`` (an int, or ``'schedule'``) and the nonfinite policy."""

  def __init__(self, num_microbatches: Any, nonfinite: str):
    self.num_microbatches = ('schedule' if callable(num_microbatches)
                             else num_microbatches)
    self.nonfinite = nonfinite

  def _key(self):
    return (self.num_microbatches, self.nonfinite)

  def __eq__(self, other):
    return isinstance(other, Config) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def __repr__(self):
    return (f'accumulate(num_microbatches={self.num_microbatches!r}, '
            f'nonfinite={self.nonfinite!r})')


def check_state(tx: Any, state: Any, params: Any) -> None:
  """Raises a ValueError if ``state`` was not made by ``tx``'s ``init``.

  Compares the static config (``k`` and policy) and the inner state's
  structure with what ``tx.inner.init`` makes for these params.
  """
  expected = Config(tx.num_microbatches, tx.nonfinite)
  if state.config is not None and state.config != expected:
    raise ValueError(
        f'The AccumulateState was made by {state.config} but is used with '
        f'{expected}. Create the state with this transform\'s init (to change '
        'k of a run, start a new window: tx.init(params)._replace('
        'inner_state=old_state.inner_state)).'
    )
  like = params if params is not None else state.acc
  try:
    inner_like = jax.eval_shape(tx.inner.init, like)
  except Exception:  # noqa: BLE001 - an init that cannot run abstractly
    return           # is not a mismatch; the inner update will check it.
  treedef = jax.tree.structure(state.inner_state)
  expected_treedef = jax.tree.structure(inner_like)
  if treedef != expected_treedef:
    raise ValueError(
        'The AccumulateState\'s inner_state does not match this accumulate\'s '
        f'inner optimizer:\n  inner_state: {treedef}\n  inner.init(params): '
        f'{expected_treedef}\nCreate the state with this transform\'s init.'
    )
