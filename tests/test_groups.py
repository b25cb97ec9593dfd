"""Parameter groups: accumulate with optax.multi_transform / masked /
set_to_zero, outside and inside it, in-step and cross-step, against
per-group references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accum_jax
from tests._helpers import assert_trees_close

K = 2
B = 8
LABELS = {'emb': {'table': 'emb'}, 'head': {'w': 'head', 'b': 'head'}}
MASK = {'emb': {'table': False}, 'head': {'w': True, 'b': True}}


def loss_fn(params, batch):
  h = params['emb']['table'][batch['tok']]
  pred = h @ params['head']['w'] + params['head']['b']
  return jnp.mean((pred - batch['y']) ** 2)


def make_params():
  k1, k2 = jax.random.split(jax.random.key(1))
  return {'emb': {'table': jax.random.normal(k1, (5, 3))},
          'head': {'w': jax.random.normal(k2, (3,)), 'b': jnp.array(0.2)}}


def make_batch(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'tok': jax.random.randint(k1, (B,), 0, 5),
          'y': jax.random.normal(k2, (B,))}


def group_reference(grads, opts, states, params):
  """Each group's optimizer on its own subtree: emb and head."""
  updates, new_states = {}, {}
  for name in ('emb', 'head'):
    updates[name], new_states[name] = opts[name].update(
        grads[name], states[name], params[name])
  return updates, new_states


def test_outside_multi_transform_in_step():
  """accumulate(multi_transform(...)): one window, then a group optimizer each."""
  params = make_params()
  tx = accum_jax.accumulate(
      optax.multi_transform({'emb': optax.sgd(0.1), 'head': optax.adam(0.1)},
                            LABELS), K)
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx))
  opts = {'emb': optax.sgd(0.1), 'head': optax.adam(0.1)}
  ref_states = {n: opts[n].init(params[n]) for n in opts}
  state = tx.init(params)
  ref_params = params
  for seed in range(2):
    batch = make_batch(seed)
    _, updates, state = step(params, state, batch)
    params = optax.apply_updates(params, updates)
    grads = jax.grad(loss_fn)(ref_params, batch)
    ref_updates, ref_states = group_reference(grads, opts, ref_states,
                                              ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    assert_trees_close(params, ref_params, rtol=2e-6, atol=2e-6)


def test_outside_frozen_group_cross_step():
  """set_to_zero for a frozen group inside accumulate: zero updates for it."""
  params = make_params()
  tx = accum_jax.accumulate(
      optax.multi_transform({'emb': optax.set_to_zero(),
                             'head': optax.adam(0.1)}, LABELS), K)
  update = jax.jit(tx.update)
  state = tx.init(params)
  batch = make_batch(0)
  grads = [jax.grad(loss_fn)(params, jax.tree.map(lambda x, j=j: x[j::K], batch))
           for j in range(K)]
  for g in grads:
    updates, state = update(g, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  ref_head, _ = optax.adam(0.1).update(
      mean['head'], optax.adam(0.1).init(params['head']), params['head'])
  assert_trees_close(updates['head'], ref_head, rtol=2e-6, atol=2e-6)
  np.testing.assert_array_equal(updates['emb']['table'], 0.0)


def test_outside_masked_passes_unmasked_gradients_through():
  """optax.masked leaves the unmasked leaves' updates as they come in: here
  the window's mean gradient. Freeze with set_to_zero, not masked alone."""
  params = make_params()
  tx = accum_jax.accumulate(optax.masked(optax.sgd(0.1), MASK), K)
  batch = make_batch(0)
  _, updates, _ = accum_jax.value_and_update(loss_fn, tx)(
      params, tx.init(params), batch)
  grads = jax.grad(loss_fn)(params, batch)
  assert_trees_close(updates['head'],
                     jax.tree.map(lambda g: -0.1 * g, grads['head']),
                     rtol=2e-6, atol=2e-6)
  assert_trees_close(updates['emb'], grads['emb'], rtol=2e-6, atol=2e-6)


def test_inside_multi_transform_not_accumulated_cross_step():
  """A frozen group outside accumulate holds no accumulator at all."""
  params = make_params()
  tx = optax.multi_transform(
      {'emb': optax.set_to_zero(),
       'head': accum_jax.accumulate(optax.adam(0.1), K)}, LABELS)
  state = tx.init(params)
  acc_state = state.inner_states['head'].inner_state
  assert isinstance(acc_state, accum_jax.AccumulateState)
  assert len(jax.tree.leaves(acc_state.acc)) == 2  # head w, b only
  update = jax.jit(tx.update)
  batch = make_batch(0)
  grads = [jax.grad(loss_fn)(params, jax.tree.map(lambda x, j=j: x[j::K], batch))
           for j in range(K)]
  updates, state = update(grads[0], state, params)
  np.testing.assert_array_equal(updates['head']['w'], 0.0)
  updates, state = update(grads[1], state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  ref_head, _ = optax.adam(0.1).update(
      mean['head'], optax.adam(0.1).init(params['head']), params['head'])
  assert_trees_close(updates['head'], ref_head, rtol=2e-6, atol=2e-6)
  np.testing.assert_array_equal(updates['emb']['table'], 0.0)


def test_inside_longer_window_for_embeddings_cross_step():
  """Embeddings every 4 micro-batches, the head every 2, one jitted update."""
  params = make_params()
  tx = optax.multi_transform(
      {'emb': accum_jax.accumulate(optax.sgd(0.1), 4),
       'head': accum_jax.accumulate(optax.adam(0.1), 2)}, LABELS)
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads = [jax.grad(loss_fn)(params, make_batch(s)) for s in range(4)]
  out = []
  for g in grads:
    updates, state = update(g, state, params)
    out.append(updates)
  adam = optax.adam(0.1)
  head_state = adam.init(params['head'])
  for i in (1, 3):
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[i - 1]['head'],
                        grads[i]['head'])
    ref, head_state = adam.update(mean, head_state, params['head'])
    assert_trees_close(out[i]['head'], ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(out[i - 1]['head']['w'], 0.0)
  for i in range(3):
    np.testing.assert_array_equal(out[i]['emb']['table'], 0.0)
  emb_mean = sum(g['emb']['table'] for g in grads) / 4
  assert_trees_close(out[3]['emb']['table'], -0.1 * emb_mean,
                     rtol=2e-6, atol=2e-6)


def test_inside_longer_window_for_embeddings_in_step():
  """In-step windows of K micro-batches for all; the embeddings' optimizer
  additionally accumulates 2 such steps (an accumulate inside the inner)."""
  params = make_params()
  tx = accum_jax.accumulate(
      optax.multi_transform(
          {'emb': accum_jax.accumulate(optax.sgd(0.1), 2),
           'head': optax.adam(0.1)}, LABELS), K)
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx))
  state = tx.init(params)
  batches = [make_batch(s) for s in range(2)]
  outs = []
  for batch in batches:
    _, updates, state = step(params, state, batch)
    outs.append(updates)
  grads = [jax.grad(loss_fn)(params, b) for b in batches]
  adam = optax.adam(0.1)
  head_state = adam.init(params['head'])
  for g, out in zip(grads, outs, strict=False):
    ref, head_state = adam.update(g['head'], head_state, params['head'])
    assert_trees_close(out['head'], ref, rtol=2e-6, atol=2e-6)
  np.testing.assert_array_equal(outs[0]['emb']['table'], 0.0)
  assert_trees_close(outs[1]['emb']['table'],
                     -0.1 * (grads[0]['emb']['table']
                             + grads[1]['emb']['table']) / 2,
                     rtol=2e-6, atol=2e-6)


def test_frozen_params_as_argument_in_step():
  """In-step, a frozen group is best not differentiated at all: pass it as an
  extra argument, and accumulate only the trainable subtree."""

  def head_loss(head, batch, emb):
    return loss_fn({'emb': emb, 'head': head}, batch)

  params = make_params()
  tx = accum_jax.accumulate(optax.adam(0.1), K)
  state = tx.init(params['head'])
  assert len(jax.tree.leaves(state.acc)) == 2
  batch = make_batch(0)
  _, updates, state = jax.jit(accum_jax.value_and_update(head_loss, tx))(
      params['head'], state, batch, params['emb'])
  grads = jax.grad(loss_fn)(params, batch)
  ref, _ = optax.adam(0.1).update(grads['head'],
                                  optax.adam(0.1).init(params['head']),
                                  params['head'])
  assert_trees_close(updates, ref, rtol=2e-6, atol=2e-6)
