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

from accum_jax import _sums

POLICIES = ('propagate', 'skip_microbatch', 'skip_step')


def check_policy(policy: Any) -> str:
  if policy not in POLICIES:
    raise ValueError(
        f'nonfinite must be one of {", ".join(map(repr, POLICIES))}; got '
        f'{policy!r}.'
    )
  return policy


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf of ``tree`` is finite.

  Each leaf's flag is "has a non-finite element", negated after the stack.
  ``jnp.all(jnp.stack(per_leaf_ok))`` is the same boolean, but XLA rewrites
  a reduce of a concatenate into a chain of scalar ANDs, which CPU fusion
  then copies into every select that reads the result: code quadratic in the
  number of leaves (a 500-leaf MLP compiled for minutes). A reduce of a
  negation stays one reduce.
  """
  bad = [jnp.any(~jnp.isfinite(x)) for x in jax.tree.leaves(tree)
         if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not bad:
    return jnp.ones([], jnp.bool_)
  return jnp.all(~jnp.stack(bad))


def max_finite(tree: Any) -> jax.Array:
  """:func:`all_finite`, read as "the largest magnitude is finite" (a NaN
  propagates through ``max``). The same flag; for a parameter-sized sum read
  once after the loop, XLA:CPU computes it without a temporary buffer, where
  the per-element test held 28 MiB on a 4096-wide MLP."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.ones([], jnp.bool_)
  return jnp.all(jnp.stack([jnp.isfinite(jnp.max(jnp.abs(x)))
                            for x in leaves]))


def screen(
    policy: str,
    micro: _sums.Micro,
    *,
    weighted: bool,
    lazy_skip_step: bool = False,
    check_grads: bool = True,
    skip: jax.Array | None = None,
) -> _sums.Micro:
  """What one micro-batch may add to the window.

  Args:
    policy: the nonfinite policy.
    micro: the micro-batch's loss (None cross-step), aux, gradient, weight
      and ``grad_scale``: None (its gradient is added with its weight), or 1
      for a pre-weighted gradient.
    weighted: whether the weight came from the user (else it is 1).
    check_grads: with ``lazy_skip_step``, False leaves the gradient's
      finiteness to one read of the window's sum after the loop
      (:func:`check_sum`).
    lazy_skip_step: in-step under ``'skip_step'``, select the gradient on a
      zero weight only, not on finiteness (see below).
    skip: bool scalar, True when ``should_skip_update_fn`` skips it: it is
      dropped (its gradient selected away, whatever the policy) and not
      counted as non-finite.

  Returns:
    ``micro`` with a dropped micro-batch's loss, aux, gradient and weight
    replaced by zeros, and ``bad`` (int32 0/1, or None under ``'propagate'``)
    telling whether it was dropped for a non-finite value.
  """
  w = micro.weight
  if weighted:
    w = jnp.where(w < 0, jnp.zeros_like(w), w)
  if skip is not None:
    w = jnp.where(skip, jnp.zeros_like(w), w)
  nonzero = w != 0  # True for a NaN weight: under 'propagate' NaN propagates.
  bad = None
  keep = nonzero
  lazy = lazy_skip_step and policy == 'skip_step' and skip is None
  if policy != 'propagate':
    # Lazily, the gradient's finiteness may be read once from the window's
    # sum (``check_sum``), not here: a reduction over each micro-batch's
    # gradient keeps it in a buffer of its own on XLA:GPU, where the add
    # into the sum is otherwise fused into the matmul that makes it.
    finite = jnp.isfinite(w)
    if not (lazy and not check_grads):
      finite = finite & all_finite(micro.grads)
    if micro.value is not None:
      finite = finite & jnp.isfinite(micro.value)
    keep = nonzero & finite
    bad = (nonzero & ~finite).astype(jnp.int32)

  def select(x, on=keep):
    return jnp.where(on, x, jnp.zeros_like(x))

  grads, scale = micro.grads, select(w)
  if lazy:
    # The window of a non-finite micro-batch is not applied and its sum is
    # reset, so its gradient may reach the sum: it is selected on its weight
    # alone, known before the backward pass. Selecting on finiteness made
    # every leaf's add wait for a reduction over all leaves, keeping a
    # micro-batch's whole gradient live at once (a parameter-sized buffer).
    grads = jax.tree.map(lambda g: select(g, nonzero), grads)
    scale = select(w, nonzero)
  elif policy != 'propagate' or skip is not None:
    # Under 'propagate' the gradient is left alone: a select here would keep
    # a scatter (embedding) gradient in a buffer of its own instead of adding
    # it into the carry in place. A weight-0 micro-batch then adds 0 * grads,
    # which is exact zeros unless its gradient is non-finite. A skipped one
    # (often skipped for being non-finite) is always selected away.
    grads = jax.tree.map(select, grads)
  return _sums.Micro(
      value=None if micro.value is None else select(micro.value),
      aux=None if micro.aux is None else jax.tree.map(select, micro.aux),
      grads=grads,
      weight=select(w),
      bad=bad,
      grad_scale=scale if micro.grad_scale is None else micro.grad_scale,
  )


def check_sum(state: Any, mean: Any) -> Any:
  """``state`` with one more dropped micro-batch when the window's gradient
  ``mean`` is not finite though no micro-batch was found non-finite: the
  gradients screened lazily (``screen(lazy_skip_step=True)``) are checked
  here, once. Non-finite values stay non-finite in a sum, so this finds a
  micro-batch whose loss and weight were finite but its gradient was not
  (and finite gradients whose sum overflows)."""
  missed = ~jnp.asarray(state.window_nonfinite, jnp.bool_) & ~max_finite(mean)
  return count_bad(state, missed.astype(jnp.int32))


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
