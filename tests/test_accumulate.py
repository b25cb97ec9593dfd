"""Tests of the cross-step ``accumulate`` transform against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import (
    assert_trees_close,
    assert_trees_equal,
    optimizer_table,
)


def _params():
  return {'w': jnp.array([[0.5, -1.0], [2.0, 0.25]]), 'b': jnp.array([0.1, -0.2])}


def _grads(seed, like):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(like)))
  leaves = [jax.random.normal(k, jnp.shape(x)) for k, x in
            zip(keys, jax.tree.leaves(like))]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


OPTIMIZERS = optimizer_table(
    clip_norm=0.5, lr_schedule=optax.linear_schedule(0.01, 0.001, 4))


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
@pytest.mark.parametrize('k', [1, 3])
def test_windows_apply_inner_once_to_the_mean(name, k):
  inner = OPTIMIZERS[name]()
  tx = accum_jax.accumulate(inner, k)
  params = _params()
  state, ref_state = tx.init(params), inner.init(params)
  update = jax.jit(tx.update)
  for window in range(3):
    grads = [_grads(10 * window + j, params) for j in range(k)]
    for j, g in enumerate(grads):
      updates, state = update(g, state, params)
      if j < k - 1:
        assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, g))
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    ref_updates, ref_state = inner.update(mean, ref_state, params)
    assert_trees_close(updates, ref_updates, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)
  assert_trees_close(state.inner_state, ref_state, rtol=1e-5, atol=1e-7)
  assert int(state.count) == 0
  assert float(state.weight) == 0.0
  assert_trees_equal(state.acc, jax.tree.map(jnp.zeros_like, params))


def test_mid_window_state_and_zero_updates():
  inner = optax.adam(0.1)
  tx = accum_jax.accumulate(inner, 3)
  params = _params()
  state = tx.init(params)
  inner_before = state.inner_state
  g0, g1 = _grads(0, params), _grads(1, params)
  updates, state = tx.update(g0, state, params)
  updates, state = tx.update(g1, state, params, weight=2.0)
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, g0))
  assert_trees_equal(state.inner_state, inner_before)
  assert state.count.dtype == jnp.int32 and int(state.count) == 2
  assert state.weight.dtype == jnp.float32 and float(state.weight) == 3.0
  assert_trees_close(state.acc, jax.tree.map(lambda a, b: a + 2 * b, g0, g1),
                     rtol=1e-6, atol=1e-7)


def test_inner_update_runs_once_per_window():
  calls = []

  def update_fn(updates, state, params=None):
    jax.debug.callback(lambda: calls.append(1))
    return updates, state

  inner = optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)
  tx = accum_jax.accumulate(inner, 4)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for j in range(8):
    _, state = update(_grads(j, params), state, params)
    jax.effects_barrier()
  assert len(calls) == 2


def test_weighted_mean():
  inner = optax.sgd(1.0)
  tx = accum_jax.accumulate(inner, 3)
  params = _params()
  state = tx.init(params)
  grads = [_grads(j, params) for j in range(3)]
  weights = [3.0, 0.0, 5.0]
  for g, w in zip(grads, weights):
    updates, state = tx.update(g, state, params, weight=w)
  expected = jax.tree.map(lambda a, b, c: -(3 * a + 5 * c) / 8, *grads)
  assert_trees_close(updates, expected, rtol=1e-6, atol=1e-7)


def test_zero_weight_window_gives_zero_updates_and_keeps_inner_state():
  inner = optax.adamw(0.1, weight_decay=0.5)
  tx = accum_jax.accumulate(inner, 2)
  params = _params()
  state = tx.init(params)
  inner_before = state.inner_state
  for j in range(2):
    updates, state = tx.update(_grads(j, params), state, params, weight=0.0)
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert_trees_equal(state.inner_state, inner_before)
  assert int(state.count) == 0


def test_extra_args_reach_the_inner_optimizer():
  inner = optax.chain(
      optax.sgd(1.0),
      optax.contrib.reduce_on_plateau(patience=0, factor=0.5, cooldown=0,
                                      accumulation_size=1))
  tx = accum_jax.accumulate(inner, 2)
  ref = inner
  params = _params()
  state, ref_state = tx.init(params), ref.init(params)
  for step, value in enumerate([1.0, 2.0, 3.0]):
    grads = _grads(step, params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params, value=jnp.asarray(value))
    ref_updates, ref_state = ref.update(grads, ref_state, params,
                                        value=jnp.asarray(value))
    assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-7)
  # The plateau was hit: the scale dropped, so the value really arrived.
  assert float(state.inner_state[1].scale) < 1.0


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_grads_accumulate_in_float32(dtype):
  k = 64
  tx = accum_jax.accumulate(optax.sgd(1.0), k)
  params = {'w': jnp.zeros(4, dtype)}
  state = tx.init(params)
  assert state.acc['w'].dtype == jnp.float32
  # 1 + 63 * 2**-12: each small term is lost when summed in bf16/fp16.
  gs = [jnp.full(4, 1.0, dtype)] + [jnp.full(4, 2.0**-12, dtype)] * (k - 1)
  update = jax.jit(tx.update)
  for g in gs:
    updates, state = update({'w': g}, state, params)
  assert updates['w'].dtype == dtype
  exact = (1.0 + (k - 1) * 2.0**-12) / k
  np.testing.assert_allclose(-np.asarray(updates['w'], np.float32),
                             exact, rtol=1e-2)
  low = jnp.zeros(4, dtype)
  for g in gs:
    low = low + g
  assert abs(float(low[0]) / k - exact) > abs(
      float(-updates['w'][0]) - exact)


def test_accumulator_dtype_options():
  params = {'a': jnp.zeros(2, jnp.bfloat16), 'b': jnp.zeros(2, jnp.float32)}
  state = accum_jax.accumulate(optax.sgd(1.0), 2).init(params)
  assert state.acc['a'].dtype == jnp.float32
  assert state.acc['b'].dtype == jnp.float32
  state = accum_jax.accumulate(optax.sgd(1.0), 2,
                               accumulator_dtype=None).init(params)
  assert state.acc['a'].dtype == jnp.bfloat16
  state = accum_jax.accumulate(optax.sgd(1.0), 2,
                               accumulator_dtype=jnp.bfloat16).init(params)
  # Never narrower than the gradient.
  assert state.acc['b'].dtype == jnp.float32


def test_state_dtypes_stable_through_scan():
  inner = optax.adam(0.1)
  tx = accum_jax.accumulate(inner, 3)
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  state = tx.init(params)

  def body(state, g):
    updates, state = tx.update({'w': g}, state, params)
    return state, updates['w']

  grads = jnp.arange(18, dtype=jnp.bfloat16).reshape(6, 3)
  final, updates = jax.lax.scan(body, state, grads)
  assert updates.dtype == jnp.bfloat16
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), final)
          == jax.tree.map(lambda x: (x.shape, x.dtype), state))
  assert int(final.inner_state[0].count) == 2


def test_jit_with_donation_does_not_retrace():
  traces = []
  tx = accum_jax.accumulate(optax.adam(0.1), 2)

  def update(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  update = jax.jit(update, donate_argnums=(1,))
  params = _params()
  state = tx.init(params)
  for j in range(6):
    _, state = update(_grads(j, params), state, params)
  assert len(traces) == 1
  assert int(state.inner_state[0].count) == 3


def test_is_an_optax_transformation_with_extra_args():
  tx = accum_jax.accumulate(optax.sgd(0.1), 4)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert tx.num_microbatches == 4
  # Chains like any optax transformation; extra args pass through the chain.
  chained = optax.chain(optax.scale(1.0), tx)
  state = chained.init(_params())
  updates, state = chained.update(_grads(0, _params()), state, _params(),
                                  weight=1.0)
  assert int(state[1].count) == 1


def test_configuration_survives_copies_and_pytree_round_trips():
  import copy
  tx = accum_jax.accumulate(optax.sgd(0.1), 4, accumulator_dtype=None)
  rebuilt = jax.tree.unflatten(jax.tree.structure(tx), jax.tree.leaves(tx))
  for t in (copy.deepcopy(tx), tx._replace(init=tx.init), rebuilt):
    assert isinstance(t, accum_jax.AccumulateTransformation)
    assert t.num_microbatches == 4 and t.accumulator_dtype is None
