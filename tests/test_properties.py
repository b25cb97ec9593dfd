"""Property tests (hypothesis): random pytrees, batch sizes, k and weights.

* accumulated == full-batch reference (value_and_grad, value_and_update, and
  cross-step tx.update one micro-batch at a time);
* zero updates between window ends;
* state structure and dtypes stable across steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import accum_jax
from tests._helpers import assert_trees_close

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)

shapes = st.sampled_from([(), (1,), (3,), (2, 3)])
dtypes = st.sampled_from(['float32', 'bfloat16'])
leaf_specs = st.tuples(shapes, dtypes)
tree_specs = st.recursive(
    leaf_specs,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from('abc'), children, min_size=1,
                        max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple)),
    max_leaves=5)


def is_leaf_spec(x):
  return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str))


def build_params(spec, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s[0]), s[1]), spec,
      is_leaf=is_leaf_spec)


def row_losses(params, x):
  """Per-row loss, non-linear in every leaf: sum over leaves of sin(p * x)."""
  total = jnp.zeros(x.shape, jnp.float32)
  for p in jax.tree.leaves(params):
    p32 = p.astype(jnp.float32).reshape(-1)
    total = total + jnp.sum(jnp.sin(p32[None, :] * x[:, None]) + 0.5
                            * (p32[None, :] * x[:, None]) ** 2, axis=1)
  return total


def weighted_loss(params, batch):
  """Weighted row mean within a batch: sum(w l) / sum(w) (0 for all-0 w).

  The denominator is guarded, as a token mean's should be: under the default
  'propagate' policy a weight-0 micro-batch adds 0 * grads, so a 0/0 loss
  would reach the accumulator as NaN.
  """
  rows = row_losses(params, batch['x'])
  total = jnp.sum(batch['w'])
  return jnp.sum(batch['w'] * rows) / jnp.where(total > 0, total, 1.0)


def mean_loss(params, batch):
  return jnp.mean(row_losses(params, batch['x']))


@st.composite
def problems(draw):
  spec = draw(tree_specs)
  k = draw(st.integers(1, 4))
  m = draw(st.integers(1, 3))
  seed = draw(st.integers(0, 2**16))
  weighted = draw(st.booleans())
  rng = np.random.default_rng(seed + 1)
  n = k * m
  batch = {'x': jnp.asarray(rng.normal(size=n), jnp.float32)}
  if weighted:
    # Some zeros (whole padding micro-batches included), total > 0.
    w = rng.choice([0.0, 0.5, 1.0, 3.0], size=n)
    w[0] = 1.0
    batch['w'] = jnp.asarray(w, jnp.float32)
  return build_params(spec, seed), batch, k, weighted


def tol(params):
  bf16 = any(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  return dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=2e-5, atol=2e-5)


def weight_fn(mb):
  return jnp.sum(mb['w'])


def reference(params, batch, weighted):
  return jax.value_and_grad(weighted_loss if weighted else mean_loss)(params,
                                                                      batch)


def structure_and_dtypes(tree):
  return jax.tree.structure(tree), [x.dtype for x in jax.tree.leaves(tree)]


# Each test runs one jitted function per example (one compile, shapes
# permitting a cache hit), not a stream of eagerly dispatched ops.
@functools.partial(jax.jit, static_argnums=(2, 3))
def accumulated_and_reference_grads(params, batch, k, weighted):
  ours = accum_jax.value_and_grad(
      weighted_loss if weighted else mean_loss, k,
      weight_fn=weight_fn if weighted else None)(params, batch)
  return ours, reference(params, batch, weighted)


@SETTINGS
@given(problems())
def test_value_and_grad_matches_full_batch(problem):
  params, batch, k, weighted = problem
  (loss, grads), (ref_loss, ref_grads) = accumulated_and_reference_grads(
      params, batch, k, weighted)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-5)
  assert_trees_close(grads, ref_grads, **tol(params), check_dtype=True)


@functools.partial(jax.jit, static_argnums=(2, 3))
def two_in_step_updates(params, batch, k, weighted):
  tx = accum_jax.accumulate(optax.sgd(1.0), k)
  step = accum_jax.value_and_update(
      weighted_loss if weighted else mean_loss, tx,
      weight_fn=weight_fn if weighted else None)
  states = [tx.init(params)]
  for _ in range(2):
    _, updates, state = step(params, states[-1], batch)
    states.append(state)
  return updates, states, reference(params, batch, weighted)[1]


@SETTINGS
@given(problems())
def test_value_and_update_matches_full_batch_and_keeps_state_stable(problem):
  params, batch, k, weighted = problem
  updates, states, ref_grads = two_in_step_updates(params, batch, k, weighted)
  before = structure_and_dtypes(states[0])
  for state in states[1:]:
    assert structure_and_dtypes(state) == before
    assert int(state.count) == 0
  assert int(states[-1].step) == 2
  assert_trees_close(updates, jax.tree.map(lambda g: -g, ref_grads),
                     **tol(params), check_dtype=True)


@functools.partial(jax.jit, static_argnums=(2, 3))
def cross_step_window(params, batch, k, weighted):
  tx = accum_jax.accumulate(optax.sgd(1.0), k)
  loss = weighted_loss if weighted else mean_loss
  states, all_updates = [tx.init(params)], []
  for j in range(k):
    mb = jax.tree.map(lambda x, j=j: x[j::k], batch)
    grads = jax.grad(loss)(params, mb)
    updates, state = tx.update(grads, states[-1], params,
                               weight=weight_fn(mb) if weighted else None)
    states.append(state)
    all_updates.append(updates)
  return all_updates, states, reference(params, batch, weighted)[1]


@SETTINGS
@given(problems())
def test_cross_step_windows(problem):
  params, batch, k, weighted = problem
  all_updates, states, ref_grads = cross_step_window(params, batch, k,
                                                     weighted)
  before = structure_and_dtypes(states[0])
  for j, (updates, state) in enumerate(zip(all_updates, states[1:], strict=False)):
    assert structure_and_dtypes(state) == before
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=False):
      assert u.dtype == p.dtype
      if j < k - 1:
        np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)
    if j < k - 1:
      assert int(state.count) == j + 1
  assert int(states[-1].count) == 0 and int(states[-1].step) == 1
  assert_trees_close(all_updates[-1], jax.tree.map(lambda g: -g, ref_grads),
                     **tol(params), check_dtype=True)
