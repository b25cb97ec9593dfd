"""The compared train steps. Every one applies the update inside its jit.

A contender turns a :class:`~benchmarks.models.Model`, an inner optimizer and
``k`` into a :class:`Contender`: a step
``step(params, opt_state, state, batch, rng) -> (params, opt_state, state,
loss)`` jitted with the params and optimizer state donated, its initial
optimizer state, and how it is driven: ``in_step`` contenders take the whole
batch in one call; ``cross_step`` ones (``optax.MultiSteps`` and accum_jax's
``accumulate`` used the same way) take one micro-batch per call and are
called ``k`` times per optimizer step, as users run them.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import accum_jax
from benchmarks.models import REMAT_POLICY, Model

DONATE = (0, 1)  # params, opt_state


class Contender(NamedTuple):
  name: str
  step: Callable[..., Any]  # un-jitted; jit with donate_argnums=DONATE
  opt_state: Any
  cross_step: bool  # one call per micro-batch, k calls per optimizer step


def _apply(params, updates):
  return optax.apply_updates(params, updates)


def full_batch(model: Model, inner, k: int) -> Contender:
  """``jax.value_and_grad`` on the whole batch (the reference; no k)."""
  del k

  def step(params, opt_state, state, batch, rng):
    (loss, state), grads = jax.value_and_grad(model.mean_loss, has_aux=True)(
        params, batch, state, rng)
    updates, opt_state = inner.update(grads, opt_state, params)
    return _apply(params, updates), opt_state, state, loss

  return Contender('full batch', step, inner.init(model.params), False)


def _remat_suffix(remat):
  if remat is None:
    return ''
  return ' +remat(full)' if remat is True else ' +remat(layers)'


def _maybe_remat(fn, remat):
  if remat is None or remat is False:
    return fn
  return jax.checkpoint(fn, policy=None if remat is True else remat)


def scan(model: Model, inner, k: int, remat=None) -> Contender:
  """The hand-written ``lax.scan``: the honest best in-step loop.

  A fresh float32 zeros carry, the batch reshaped to ``(k, B // k, ...)`` and
  scanned over, the summed loss differentiated per micro-batch (MaxText's
  token-sum weighting) and divided once by the total count.
  """

  def step(params, opt_state, state, batch, rng):
    xs = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]),
                      batch)
    grad_fn = jax.value_and_grad(_maybe_remat(model.loss_sum, remat),
                                 has_aux=True)

    def body(carry, inputs):
      g_sum, l_sum, n_sum, s_sum = carry
      j, mb = inputs
      (loss, s), g = grad_fn(params, mb, state, jax.random.fold_in(rng, j))
      g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
      s_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), s_sum, s)
      return (g_sum, l_sum + loss, n_sum + model.count(mb), s_sum), None

    def f32_zeros(tree):
      return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)

    init = (f32_zeros(params), jnp.zeros([]), jnp.zeros([]), f32_zeros(state))
    (g_sum, l_sum, n_sum, s_sum), _ = jax.lax.scan(
        body, init, (jnp.arange(k), xs))
    grads = jax.tree.map(lambda a, p: (a / n_sum).astype(p.dtype), g_sum,
                         params)
    state = jax.tree.map(lambda a, s: (a / k).astype(s.dtype), s_sum, state)
    updates, opt_state = inner.update(grads, opt_state, params)
    return _apply(params, updates), opt_state, state, l_sum / n_sum

  name = 'hand-written scan' + _remat_suffix(remat)
  return Contender(name, step, inner.init(model.params), False)


def optax_microbatch(model: Model, inner, k: int) -> Contender:
  """``optax.microbatching.microbatch`` over ``value_and_grad`` of the sum."""

  def step(params, opt_state, state, batch, rng):
    def fn(batch):
      (loss, s), g = jax.value_and_grad(model.loss_sum, has_aux=True)(
          params, batch, state, rng)
      return loss, model.count(batch), g, s

    Acc = optax.microbatching.AccumulationType
    l_sum, n_sum, g_sum, state = optax.microbatching.microbatch(
        fn, argnums=0, microbatch_size=jax.tree.leaves(batch)[0].shape[0] // k,
        accumulator=(Acc.SUM, Acc.SUM, Acc.SUM, Acc.MEAN))(batch)
    grads = jax.tree.map(lambda a: a / n_sum.astype(a.dtype), g_sum)
    updates, opt_state = inner.update(grads, opt_state, params)
    return _apply(params, updates), opt_state, state, l_sum / n_sum

  return Contender('optax.microbatching', step, inner.init(model.params),
                   False)


def multisteps(model: Model, inner, k: int) -> Contender:
  """``optax.MultiSteps`` driven ``k`` times, one jitted call per micro-batch.

  MultiSteps averages the micro-batches' mean losses' gradients, which for the
  padded LM is a mean of token means, not the token mean.
  """
  tx = optax.MultiSteps(inner, every_k_schedule=k)

  def step(params, opt_state, state, microbatch, rng):
    (loss, state), grads = jax.value_and_grad(model.mean_loss, has_aux=True)(
        params, microbatch, state, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return _apply(params, updates), opt_state, state, loss

  return Contender('optax.MultiSteps', step, tx.init(model.params), True)


def accum_cross_step(model: Model, inner, k: int) -> Contender:
  """``accum_jax.accumulate`` driven ``k`` times (token-weighted for the LM)."""
  tx = accum_jax.accumulate(inner, k)

  def step(params, opt_state, state, microbatch, rng):
    (loss, state), grads = jax.value_and_grad(model.mean_loss, has_aux=True)(
        params, microbatch, state, rng)
    weight = model.count(microbatch) if model.token_weighted else None
    updates, opt_state = tx.update(grads, opt_state, params, weight=weight)
    return _apply(params, updates), opt_state, state, loss

  return Contender('accum_jax accumulate (cross-step)', step,
                   tx.init(model.params), True)


def accum_in_step(model: Model, inner, k: int, remat=None,
                  unroll=1) -> Contender:
  """``accum_jax.value_and_update``: the whole window in one ``lax.scan``."""
  tx = accum_jax.accumulate(inner, k)
  grad_step = accum_jax.value_and_update(
      lambda p, b, s, rng: model.mean_loss(p, b, s, rng), tx, has_aux=True,
      weight_fn=model.weight_fn, remat=remat, unroll=unroll)

  def step(params, opt_state, state, batch, rng):
    (loss, state), updates, opt_state = grad_step(params, opt_state, batch,
                                                  state, rng=rng)
    return _apply(params, updates), opt_state, state, loss

  name = 'accum_jax value_and_update' + _remat_suffix(remat)
  if unroll != 1:
    name += f' unroll={unroll}'
  return Contender(name, step, tx.init(model.params), False)


def make_accum_step(model: Model, inner):
  """``make_step(k, remat[, unroll])`` for
  :func:`accum_jax.plan_microbatches`."""
  return lambda k, remat, unroll=1: accum_in_step(model, inner, k, remat,
                                                  unroll).step


# name -> builder(model, inner, k); the remat rows are built separately.
CONTENDERS = {
    'full': full_batch,
    'scan': scan,
    'optax_microbatch': optax_microbatch,
    'multisteps': multisteps,
    'accum_cross_step': accum_cross_step,
    'accum': accum_in_step,
    'scan_remat': lambda m, i, k: scan(m, i, k, remat=REMAT_POLICY),
    'accum_remat': lambda m, i, k: accum_in_step(m, i, k, remat=REMAT_POLICY),
    'accum_remat_full': lambda m, i, k: accum_in_step(m, i, k, remat=True),
}
# remat=True checkpoints the whole per-micro-batch loss: the backward pass
# recomputes the whole forward at once, so it rarely lowers the peak; it is
# left out of the default grid (compile time) but can be asked for.
DEFAULT = tuple(k for k in CONTENDERS if k != 'accum_remat_full')
