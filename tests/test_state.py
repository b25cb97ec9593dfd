"""The state between steps: fresh states donate, ``cross_step=False`` keeps no
accumulator, and the window guard XLA:GPU and XLA:TPU compile (selects) gives
the numbers of the one XLA:CPU compiles (a cond).

The references are the full-batch step, a transform built the other way, and
``optax.adam`` applied by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from accum_jax import _accumulate
from tests._helpers import (
  assert_trees_close,
  assert_trees_equal,
  linear_batch,
  linear_loss,
  linear_params,
  microbatch,
)

K, LR = 4, 0.1


def _count(mb):
  """A data-dependent weight: 1 + the rows with a positive target."""
  return 1.0 + jnp.sum(mb['y'] > 0).astype(jnp.float32)


OPTIONS = {
    'plain': {},
    'skip_microbatch': {'nonfinite': 'skip_microbatch'},
    'skip_step': {'nonfinite': 'skip_step'},
    'noise': {'track_noise_scale': True},
    'predicate': {'should_skip_update_fn': optax.skip_not_finite},
    'in_step_only': {'cross_step': False},
    'in_step_only_noise': {'cross_step': False, 'track_noise_scale': True},
}


@pytest.mark.parametrize('name', OPTIONS)
def test_fresh_state_donates_in_step(name):
  options = OPTIONS[name]
  params = linear_params()
  tx = accum_jax.accumulate(optax.adam(LR), K, **options)
  step = jax.jit(accum_jax.value_and_update(linear_loss, tx),
                 donate_argnums=(0, 1))
  loss, updates, state = step(params, tx.init(params), linear_batch())
  assert bool(jnp.isfinite(loss)) and int(state.step) == 1


@pytest.mark.parametrize('name', [n for n, o in OPTIONS.items()
                                  if o.get('cross_step', True)])
def test_fresh_state_donates_cross_step(name):
  options = OPTIONS[name]
  params = linear_params()
  tx = accum_jax.accumulate(optax.adam(LR), K, **options)
  update = jax.jit(tx.update, donate_argnums=(1,))
  _, state = update(params, tx.init(params), params)
  assert int(state.count) == 1


def _anchored(inner):
  """An inner optimizer whose state holds the params it was made with (an
  anchor, as in EWC or a proximal term): its init returns them as they are."""
  def init(params):
    return {'anchor': params, 'inner': inner.init(params)}

  def update(grads, state, params=None):
    updates, inner_state = inner.update(grads, state['inner'], params)
    return updates, {'anchor': state['anchor'], 'inner': inner_state}

  return optax.GradientTransformation(init, update)


@pytest.mark.parametrize('cross_step', [True, False])
def test_state_holding_the_params_donates_with_them(cross_step):
  params = linear_params()
  inner = _anchored(optax.sgd(LR))
  assert inner.init(params)['anchor'] is params  # what would fail to donate
  tx = accum_jax.accumulate(inner, K, cross_step=cross_step)
  state = tx.init(params)
  anchor = state.inner_state['anchor']
  assert all(a is not p for a, p in zip(jax.tree.leaves(anchor),
                                        jax.tree.leaves(params)))
  assert_trees_equal(anchor, params)
  step = jax.jit(accum_jax.value_and_update(linear_loss, tx),
                 donate_argnums=(0, 1))
  _, _, state = step(params, state, linear_batch())
  assert int(state.step) == 1


def _steps(tx, weighted, n=3):
  step = jax.jit(accum_jax.value_and_update(
      linear_loss, tx, weight_fn=_count if weighted else None))
  params, state = linear_params(), tx.init(linear_params())
  for i in range(n):
    loss, updates, state = step(params, state, linear_batch(seed=i))
    params = optax.apply_updates(params, updates)
  return params, state, loss


@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('nonfinite', ['propagate', 'skip_step'])
def test_in_step_only_matches_the_full_batch(weighted, nonfinite):
  tx = accum_jax.accumulate(optax.adam(LR), K, nonfinite=nonfinite,
                            cross_step=False)
  params, state, loss = _steps(tx, weighted)
  assert state.acc == () and int(state.step) == 3
  ref_params, adam = linear_params(), optax.adam(LR)
  ref_state = adam.init(ref_params)
  for i in range(3):
    batch = linear_batch(seed=i)
    if weighted:  # the token-count weighted mean over micro-batches
      parts = [microbatch(batch, j, K) for j in range(K)]
      weights = [_count(mb) for mb in parts]
      grads = jax.tree.map(
          lambda *g: sum(w * x for w, x in zip(weights, g)) / sum(weights),
          *[jax.grad(linear_loss)(ref_params, mb) for mb in parts])
    else:
      grads = jax.grad(linear_loss)(ref_params, batch)
    updates, ref_state = adam.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6)
  assert_trees_close(state.inner_state, ref_state, rtol=1e-5, atol=1e-6)


def test_in_step_only_refuses_cross_step_calls():
  params = linear_params()
  tx = accum_jax.accumulate(optax.sgd(LR), K, cross_step=False)
  state = tx.init(params)
  with pytest.raises(ValueError, match='cross_step=False'):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match='cross_step=False'):
    accum_jax.flush(tx, state, params)
  other = accum_jax.accumulate(optax.sgd(LR), K)
  step = accum_jax.value_and_update(linear_loss, other)
  with pytest.raises(ValueError, match=r'has no accumulator .*cross_step=True'):
    step(params, state, linear_batch())
  with pytest.raises(TypeError, match='cross_step must be a bool'):
    accum_jax.accumulate(optax.sgd(LR), K, cross_step='no')


def _poison_gradient_only(params, batch):
  """A loss whose value is finite but whose gradient is not on a row whose
  ``z`` equals the bias (sqrt at 0)."""
  return linear_loss(params, batch) + jnp.mean(
      jnp.sqrt(jnp.abs(params['b'] - batch['z'])))


def test_skip_step_finds_a_nonfinite_gradient_behind_a_finite_loss():
  params = linear_params()
  batch = dict(linear_batch(), z=jnp.ones(16).at[5].set(params['b']))
  for j in range(K):
    loss, grads = jax.value_and_grad(_poison_gradient_only)(
        params, microbatch(batch, j, K))
    assert bool(jnp.isfinite(loss))
    assert bool(jnp.isfinite(grads['b'])) == (j != 5 % K)
  tx = accum_jax.accumulate(optax.adam(LR), K, nonfinite='skip_step')
  state = tx.init(params)
  _, updates, state = jax.jit(accum_jax.value_and_update(
      _poison_gradient_only, tx))(params, state, batch)
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert_trees_equal(state.inner_state, optax.adam(LR).init(params))
  assert int(state.skipped_steps) == 1
  assert int(state.skipped_microbatches) == 1
  assert_trees_equal(state.acc, jax.tree.map(jnp.zeros_like, params))


@pytest.fixture
def select_guard(monkeypatch):
  """The guard of XLA:GPU and XLA:TPU (selects) on this CPU."""
  monkeypatch.setattr(_accumulate, 'COND_PLATFORMS', ())


def _poisoned(bad, row):
  batch = linear_batch()
  return dict(batch, x=batch['x'].at[row, 0].set(bad))


# (Under 'propagate' a NaN micro-batch reaches the updates by either guard.)
CASES = [(case, policy) for case in ('nan', 'empty', 'clean')
         for policy in ('propagate', 'skip_microbatch', 'skip_step')
         if (case, policy) != ('nan', 'propagate')]


def _both_branches(run, monkeypatch):
  """``run()`` with XLA:CPU's formulations, then with the GPU/TPU ones (forced
  on this CPU); two programs, fused differently, equal to the rounding of
  each."""
  by_cond = run()
  monkeypatch.setattr(_accumulate, 'COND_PLATFORMS', ())
  by_default = run()
  assert_trees_close(by_default, by_cond, rtol=1e-6, atol=1e-9)
  return by_cond, by_default


@pytest.mark.parametrize('case,nonfinite', CASES)
def test_select_guard_gives_the_cond_guard_numbers(case, nonfinite,
                                                   monkeypatch):
  params = linear_params()
  batch = _poisoned(jnp.nan, 5) if case == 'nan' else linear_batch()
  weight_fn = (lambda mb: jnp.zeros([])) if case == 'empty' else _count

  def run():
    tx = accum_jax.accumulate(optax.adam(LR), K, nonfinite=nonfinite)
    step = jax.jit(accum_jax.value_and_update(linear_loss, tx,
                                              weight_fn=weight_fn))
    state = tx.init(params)
    out = []
    for b in (batch, linear_batch(seed=1)):
      _, updates, state = step(params, state, b)
      out.append(updates)
    return out, state

  by_cond, by_select = _both_branches(run, monkeypatch)
  if case != 'clean':  # the first window is not applied: exact zeros
    skipped = nonfinite != 'skip_microbatch' or case == 'empty'
    zeros = jax.tree.map(jnp.zeros_like, params)
    if skipped:
      assert_trees_equal(by_select[0][0], zeros)
      assert_trees_equal(by_cond[0][0], zeros)
    assert int(by_select[1].skipped_steps) == int(by_cond[1].skipped_steps)


def test_select_guard_lowers_no_cond_for_the_window(select_guard):
  tx = accum_jax.accumulate(optax.adam(LR), K, nonfinite='skip_step')
  step = accum_jax.value_and_update(linear_loss, tx, weight_fn=_count)
  params = linear_params()
  text = jax.jit(step).lower(params, tx.init(params),
                             linear_batch()).compile().as_text()
  assert ' conditional(' not in text


@functools.lru_cache
def _ragged(unroll):
  tx = accum_jax.accumulate(optax.sgd(LR), K)
  return tx, jax.jit(accum_jax.value_and_update(
      linear_loss, tx, has_aux=True, aux='stack', unroll=unroll,
      weight_fn=_count))


@pytest.mark.parametrize('unroll', [1, 2])
def test_ragged_window_stacks_zeros_for_padding(unroll):
  """num_real_microbatches: a while loop over the real micro-batches only
  (unroll=1), or an unrolled scan over all (unroll=2); the same numbers."""
  def loss(params, batch):
    return linear_loss(params, batch), {'m': jnp.mean(batch['y'])}

  tx = accum_jax.accumulate(optax.sgd(LR), K)
  step = jax.jit(accum_jax.value_and_update(
      loss, tx, has_aux=True, aux='stack', unroll=unroll,
      weight_fn=_count))
  params, batch = linear_params(), linear_batch()
  (value, aux), updates, _ = step(params, tx.init(params), batch,
                                  num_real_microbatches=jnp.int32(3))
  parts = [microbatch(batch, j, K) for j in range(3)]
  weights = np.array([float(_count(mb)) for mb in parts])
  grads = [jax.grad(linear_loss)(params, mb) for mb in parts]
  mean = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g))
                      / weights.sum(), *grads)
  assert_trees_close(updates, jax.tree.map(lambda g: -LR * g, mean),
                     rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      aux['m'], [float(jnp.mean(mb['y'])) for mb in parts] + [0.0],
      rtol=1e-6)
  np.testing.assert_allclose(
      value, sum(w * float(linear_loss(params, mb))
                 for w, mb in zip(weights, parts)) / weights.sum(),
      rtol=1e-6)


@pytest.mark.parametrize('case,nonfinite', CASES)
def test_cross_step_loop_gives_the_cond_numbers(case, nonfinite,
                                                monkeypatch):
  """Cross-step, XLA:GPU and XLA:TPU end a window in a while_loop that runs
  once (forced here on the CPU): the numbers of XLA:CPU's cond, mid-window
  zeros included, over two windows and an early end."""
  params = linear_params()
  batch = _poisoned(jnp.nan, 5) if case == 'nan' else linear_batch()
  parts = [microbatch(batch, j, K) for j in range(K)]
  parts += [microbatch(linear_batch(seed=1), j, K) for j in range(K - 1)]
  weights = [jnp.zeros([]) if case == 'empty' else _count(mb) for mb in parts]

  def run():
    tx = accum_jax.accumulate(optax.adam(LR), K, nonfinite=nonfinite)
    update = jax.jit(tx.update)
    state, out = tx.init(params), []
    for j, (mb, w) in enumerate(zip(parts, weights)):
      grads = jax.grad(linear_loss)(params, mb)
      end = jnp.asarray(j == len(parts) - 1)  # the second window ends early
      updates, state = update(grads, state, params, weight=w, end_window=end)
      out.append(updates)
    return out, state

  by_cond, by_loop = _both_branches(run, monkeypatch)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for j in (0, 1, 2, 4, 5):  # mid-window calls: exact zeros
    assert_trees_equal(by_loop[0][j], zeros)
  assert int(by_loop[1].step) == 2 and int(by_loop[1].count) == 0
  assert int(by_loop[1].skipped_steps) == int(by_cond[1].skipped_steps)
