"""``unroll=``: the micro-batch loop unrolled, same numbers, and the planner
weighing it against the memory budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import checkpoint_name

import accum_jax
from tests._helpers import assert_trees_close

B, WIDTH, DEPTH, K = 64, 32, 3, 4
# Saves only the layer outputs: less memory than no remat, more flops.
LAYERS = jax.checkpoint_policies.save_only_these_names('layer')


def loss_fn(params, batch):
  h = batch['x']
  for w in params:
    z = h @ w
    h = checkpoint_name(jnp.tanh(z) * jnp.sin(z) + jnp.cos(z) * z, 'layer')
  return jnp.mean((h - batch['y']) ** 2)


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH),
                      jnp.float32) for _ in range(DEPTH)]


def make_batch(seed=1):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.normal(size=(B, WIDTH)), jnp.float32),
          'y': jnp.asarray(rng.normal(size=(B, WIDTH)), jnp.float32)}


def close(got, want):
  assert_trees_close(got, want, rtol=2e-5, atol=1e-6)


def while_loops(fn, *args):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return sum(' while(' in line for line in text.splitlines())


# unroll=3 does not divide k = 4: one iteration of 3 and a remainder of 1,
# so no loop is left (XLA removes a one-trip loop).
@pytest.mark.parametrize('unroll, loops', ((1, 1), (2, 1), (3, 0), (True, 0)))
def test_value_and_grad_equals_full_batch(unroll, loops):
  params, batch = make_params(), make_batch()
  want = jax.value_and_grad(loss_fn)(params, batch)
  f = accum_jax.value_and_grad(loss_fn, K, unroll=unroll)
  close(jax.jit(f)(params, batch), want)
  assert while_loops(f, params, batch) == loops


def test_value_and_update_equals_full_batch_adam():
  params, batch = make_params(), make_batch()
  inner = optax.adam(1e-2)
  ref_p, ref_s = params, inner.init(params)
  for _ in range(2):
    updates, ref_s = inner.update(jax.grad(loss_fn)(ref_p, batch), ref_s,
                                  ref_p)
    ref_p = optax.apply_updates(ref_p, updates)
  tx = accum_jax.accumulate(inner, K)

  @jax.jit
  def step(p, s, b):
    loss, updates, s = accum_jax.value_and_update(loss_fn, tx, unroll=True)(
        p, s, b)
    return optax.apply_updates(p, updates), s, loss

  p, s = params, tx.init(params)
  for _ in range(2):
    p, s, _ = step(p, s, batch)
  close(p, ref_p)
  assert int(s.count) == 0


def test_unroll_with_ragged_window_and_weights():
  params, batch = make_params(), make_batch()

  def weight(mb):  # differs per micro-batch, so a weighting bug shows
    return 1.0 + jnp.mean(jnp.abs(mb['x']))

  def weighted(p):  # the 3 real strided micro-batches, weighted
    mbs = [jax.tree.map(lambda x, j=j: x[j::K], batch) for j in range(3)]
    ws = [weight(mb) for mb in mbs]
    return sum(w * loss_fn(p, mb) for w, mb in zip(ws, mbs)) / sum(ws)

  f = accum_jax.value_and_grad(loss_fn, K, unroll=2, weight_fn=weight)
  close(jax.jit(f)(params, batch, num_real_microbatches=3),
        jax.value_and_grad(weighted)(params))


def test_linen_train_step_forwards_unroll():
  nn = pytest.importorskip('flax.linen')
  from flax.training import train_state  # pylint: disable=g-import-not-at-top

  batch = make_batch()
  model = nn.Dense(WIDTH)
  variables = model.init(jax.random.key(0), batch['x'][:1])

  def mse(p, b):
    return jnp.mean((model.apply({'params': p}, b['x']) - b['y']) ** 2)

  ref = train_state.TrainState.create(apply_fn=model.apply,
                                      params=variables['params'],
                                      tx=optax.sgd(0.1))
  ref = ref.apply_gradients(grads=jax.grad(mse)(ref.params, batch))
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      tx=accum_jax.accumulate(optax.sgd(0.1), K))

  def step(st, b):
    return accum_jax.linen_train_step(st, b, mse, unroll=True)

  assert while_loops(step, state, batch) == 0
  state, _ = jax.jit(step)(state, batch)
  close(state.params, ref.params)


@pytest.mark.parametrize('bad, error, match', (
    (0, ValueError, r'unroll must be >= 1 .*got 0'),
    (-2, ValueError, r'unroll must be >= 1'),
    (1.5, TypeError, r'unroll must be an int >= 1 or a bool .*got float'),
    ('full', TypeError, r'got str'),
))
def test_bad_unroll(bad, error, match):
  with pytest.raises(error, match=match):
    accum_jax.value_and_grad(loss_fn, K, unroll=bad)
  with pytest.raises(error, match=match):
    accum_jax.value_and_update(loss_fn, accum_jax.accumulate(
        optax.sgd(0.1), K), unroll=bad)


def make_step(k, remat, unroll=1):
  tx = accum_jax.accumulate(optax.adam(1e-3), k)
  grad_step = accum_jax.value_and_update(loss_fn, tx, remat=remat,
                                         unroll=unroll)

  def step(params, opt_state, batch):
    loss, updates, opt_state = grad_step(params, opt_state, batch)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def planner_args():
  params = make_params()
  opt_state = accum_jax.accumulate(optax.adam(1e-3), 1).init(params)
  batch = {'x': jax.ShapeDtypeStruct((256, WIDTH), jnp.float32),
           'y': jax.ShapeDtypeStruct((256, WIDTH), jnp.float32)}
  return params, opt_state, batch


def peak(k, remat, unroll):
  return accum_jax.compiled_memory(make_step(k, remat, unroll),
                                   *planner_args(),
                                   donate_argnums=(0, 1)).peak_bytes


def plan(budget, remat=(None,), unroll=(1, 2, True), ks=(4,), lines=None):
  return accum_jax.plan_microbatches(
      make_step, *planner_args(), batch_argnum=2, donate_argnums=(0, 1),
      budget_bytes=budget, num_microbatches=ks, remat=remat, unroll=unroll,
      print_fn=None if lines is None else lines.append)


def test_planner_takes_the_largest_unroll_that_fits():
  lines = []
  roomy = plan(10**9, lines=lines)
  rolled, two, full = (c.peak_bytes for c in roomy.candidates)
  assert rolled < two < full  # unrolling costs memory
  assert full == peak(4, None, True)
  assert (roomy.num_microbatches, roomy.unroll) == (4, True)
  assert roomy.peak_bytes == full
  assert [c.unroll for c in roomy.candidates] == [1, 2, True]
  header, *rows = lines[0].splitlines()
  assert 'unroll' in header
  assert rows[2].split()[2] == 'full' and rows[2].endswith('<- chosen')
  tight = plan((two + full) // 2)
  assert (tight.unroll, tight.peak_bytes) == (2, two)
  assert plan(rolled).unroll == 1


def test_planner_prefers_no_recomputation_to_unrolling():
  budget = peak(4, None, 2) - 1  # unroll=2 fits only with remat
  assert peak(4, LAYERS, 2) <= budget
  chosen = plan(budget, remat=(LAYERS, None), unroll=(2, 1))
  assert (chosen.remat, chosen.unroll) == (None, 1)
  # Given remat only, it unrolls as far as the budget allows.
  chosen = plan(budget, remat=(LAYERS,), unroll=(1, 2))
  assert (chosen.remat, chosen.unroll) == (LAYERS, 2)


def test_planner_smallest_k_first():
  # k = 2 rolled fits where k = 4 unrolled would too: fewer micro-batches win.
  budget = peak(2, None, 1)
  chosen = plan(budget, unroll=(1, True), ks=(2, 4))
  assert (chosen.num_microbatches, chosen.unroll) == (2, 1)


def test_planner_without_unroll_calls_make_step_with_two_arguments():
  calls = []

  def two(k, remat):
    calls.append((k, remat))
    return make_step(k, remat)

  chosen = accum_jax.plan_microbatches(
      two, *planner_args(), batch_argnum=2, budget_bytes=10**9,
      num_microbatches=(4,), remat=(None,), print_fn=None)
  assert calls == [(4, None)] and chosen.unroll is None
  assert chosen.candidates[0].unroll is None
  with pytest.raises(ValueError, match='unroll must be >= 1'):
    plan(10**9, unroll=(0,))
  with pytest.raises(ValueError, match='unroll must name at least one'):
    plan(10**9, unroll=())


def test_benchmark_script_runs(tmp_path):
  pytest.importorskip('flax')
  from benchmarks import unroll as bench  # pylint: disable=g-import-not-at-top

  bench.main(['--size', 'tiny', '--k', '4', '--unrolls', '1,4',
              '--rounds', '1', '--reps', '1', '--out', str(tmp_path)])
  text = (tmp_path / 'unroll.md').read_text()
  assert 'full batch' in text and 'unroll=4' in text
