"""Non-finite micro-batches and the weights that decide what is accumulated.

A micro-batch contributes ``weight * grads`` to the window. ``screen`` turns
what a micro-batch produced into what is safe to add: a negative traced weight
counts as 0, a padding micro-batch (past ``num_real_microbatches``) has weight
0, and under the skip policies a micro-batch with a non-finite gradient, weight
or loss has weight 0 too. Under the skip policies whatever is dropped is
replaced by exact zeros with ``jnp.where`` before it is multiplied, so
``0 * inf = NaN`` never reaches the accumulator; ``'propagate'`` is plain
arithmetic on the gradient (``0 * grads``).

A user predicate (``should_skip_update_fn``, optax.MultiSteps' protocol) is
asked first, by :func:`ask`: a micro-step it skips is dropped like a padding
micro-batch, with a select on its gradient whatever the policy.
"""

from typing import Any

import jax
import jax.numpy as jnp

POLICIES = ('propagate', 'skip_microbatch', 'skip_step')


def check_policy(policy: Any) -> str:
  if policy not in POLICIES:
    raise ValueError(
        f'nonfinite must be one of {", ".join(map(repr, POLICIES))}; got '
        f'{policy!r}.'
    )
  return policy


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.ones([], jnp.bool_)
  return jnp.all(jnp.stack(leaves))


def screen(
    policy: str,
    grads: Any,
    weight: jax.Array,
    *,
    weighted: bool,
    real: jax.Array | None = None,
    value: jax.Array | None = None,
    aux: Any = None,
    skip: jax.Array | None = None,
):
  """What one micro-batch may add to the window.

  Args:
    policy: the nonfinite policy.
    grads: the micro-batch's gradient.
    weight: its float32 weight.
    weighted: whether the weight came from the user (else it is 1).
    real: bool scalar, False for a padding micro-batch.
    value: its loss (in-step), checked for finiteness too.
    aux: its aux (in-step), zeroed with the rest when dropped.
    skip: bool scalar, True when ``should_skip_update_fn`` skips it: it is
      dropped (its gradient selected away, whatever the policy) and not
      counted as non-finite.

  Returns:
    ``(value, aux, grads, weight, bad)``: the inputs with a dropped micro-batch
    replaced by zeros, and ``bad`` (int32 0/1, or None under ``'propagate'``)
    telling whether it was dropped for a non-finite value.
  """
  w = weight
  if weighted:
    w = jnp.where(w < 0, jnp.zeros_like(w), w)
  if real is not None:
    w = jnp.where(real, w, jnp.zeros_like(w))
  if skip is not None:
    w = jnp.where(skip, jnp.zeros_like(w), w)
  nonzero = w != 0  # True for a NaN weight: under 'propagate' NaN propagates.
  bad = None
  keep = nonzero
  if policy != 'propagate':
    finite = all_finite(grads) & jnp.isfinite(w)
    if value is not None:
      finite = finite & jnp.isfinite(value)
    keep = nonzero & finite
    bad = (nonzero & ~finite).astype(jnp.int32)

  def select(x):
    return jnp.where(keep, x, jnp.zeros_like(x))

  w = select(w)
  if policy != 'propagate' or skip is not None:
    # Under 'propagate' the gradient is left alone: a select here would keep
    # a scatter (embedding) gradient in a buffer of its own instead of adding
    # it into the carry in place. A weight-0 micro-batch then adds 0 * grads,
    # which is exact zeros unless its gradient is non-finite. A skipped one
    # (often skipped for being non-finite) is always selected away.
    grads = jax.tree.map(select, grads)
  if value is not None:
    value = select(value)
  if aux is not None:
    aux = jax.tree.map(select, aux)
  return value, aux, grads, w, bad


def count_bad(state: Any, bad: jax.Array | None) -> Any:
  """Adds ``bad`` dropped micro-batches to the state's counters."""
  if bad is None:
    return state
  return state._replace(
      skipped_microbatches=jnp.asarray(state.skipped_microbatches, jnp.int32)
      + bad,
      window_nonfinite=jnp.asarray(state.window_nonfinite, jnp.bool_)
      | (bad > 0),
  )


def window_ok(policy: str, state: Any) -> jax.Array:
  """Whether a finished window is applied: a weight that is not 0 (a NaN
  weight under ``'propagate'`` propagates), and no non-finite micro-batch
  under ``'skip_step'``."""
  ok = ~(state.weight <= 0)
  if policy == 'skip_step':
    ok = ok & ~jnp.asarray(state.window_nonfinite, jnp.bool_)
  return ok


def skip_info_like(fn: Any, params: Any) -> Any:
  """Zeros shaped like the info ``fn(updates, gradient_step, params)``
  returns: the ``skip_state`` before any micro-step (``()`` without ``fn``)."""
  if fn is None:
    return ()
  grads = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  _, info = jax.eval_shape(fn, grads, step, params)
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), info)


def ask(fn: Any, grads: Any, gradient_step: jax.Array, params: Any,
        info_like: Any) -> tuple[jax.Array, Any]:
  """``fn(grads, gradient_step, params)``: whether to skip this micro-step,
  and its info in the structure and dtypes of ``info_like`` (the state's
  ``skip_state``), so a ``lax.cond`` or scan carries it unchanged."""
  should_skip, info = fn(grads, gradient_step, params)
  should_skip = jnp.asarray(should_skip)
  if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
    raise ValueError(
        'should_skip_update_fn must return (should_skip, info) with '
        'should_skip a boolean scalar array, but it returned dtype '
        f'{should_skip.dtype} and shape {should_skip.shape}.'
    )
  if jax.tree.structure(info) != jax.tree.structure(info_like):
    raise ValueError(
        'should_skip_update_fn returned info with structure '
        f'{jax.tree.structure(info)}, but the state\'s skip_state has '
        f'{jax.tree.structure(info_like)}. Create the state with this '
        'transform\'s init.'
    )
  info = jax.tree.map(lambda x, like: jnp.asarray(x).astype(like.dtype),
                      info, info_like)
  return should_skip, info
