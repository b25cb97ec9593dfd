"""The gradient noise scale: closed-form accuracy, a hand-written reference
estimator, the MLP against a direct estimate, the helpers, checkpoints, and
(in a subprocess) an 8-device mesh.

Linear regression with the per-example loss ``(x.w - y)^2 / 2``, ``x ~ N(0,
I_d)``, ``y = x.w* + sigma * eps`` at a fixed ``w``: with ``delta = w - w*``
the per-example gradient is ``g = (x.delta - sigma eps) x``, so ``G = delta``
and, by Isserlis, ``E|g|^2 = (d + 2)|delta|^2 + sigma^2 d``: ``tr Sigma =
(d + 1)|delta|^2 + sigma^2 d`` and ``b_simple = ((d + 1)|G|^2 + sigma^2 d) /
|G|^2`` (docs/noise_scale.md).
"""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax

HERE = pathlib.Path(__file__).parent
D, SIGMA = 8, 1.0
W = jnp.ones(D) / np.sqrt(D)  # |delta|^2 = 1 (w* = 0)
GRAD_SQ = 1.0
TRACE = (D + 1) * GRAD_SQ + SIGMA ** 2 * D
B_SIMPLE = TRACE / GRAD_SQ  # 17


def half_mse(w, batch):
  """The mean of ``(x.w - y)^2 / 2`` over the real rows (``mask``)."""
  r = batch['x'] @ w - batch['y']
  m = batch['mask']
  return 0.5 * jnp.sum(m * r ** 2) / jnp.maximum(jnp.sum(m), 1.0)


def real_rows(batch):
  return jnp.sum(batch['mask'])


def regression_batch(key, rows, k, sizes=None):
  """``rows * k`` rows; with ``sizes`` micro-batch ``j`` of the strided split
  has ``sizes[j]`` real rows (the rest are masked)."""
  kx, ke = jax.random.split(key)
  x = jax.random.normal(kx, (rows * k, D))
  y = SIGMA * jax.random.normal(ke, (rows * k,))
  if sizes is None:
    mask = jnp.ones(rows * k)
  else:
    i = jnp.arange(rows * k)
    mask = (i // k < jnp.asarray(sizes)[i % k]).astype(jnp.float32)
  return {'x': x, 'y': y, 'mask': mask}


def in_step_estimate(k, rows, windows, *, sizes=None, decay=0.999, seed=0):
  weighted = sizes is not None
  tx = accum_jax.accumulate(optax.sgd(0.0), k, track_noise_scale=True,
                            noise_scale_decay=decay)
  step = accum_jax.value_and_update(
      half_mse, tx, weight_fn=real_rows if weighted else None)

  @jax.jit
  def run(key):
    def body(i, state):
      batch = regression_batch(jax.random.fold_in(key, i), rows, k, sizes)
      return step(W, state, batch)[2]
    return jax.lax.fori_loop(0, windows, body, tx.init(W))

  return accum_jax.noise_scale(run(jax.random.key(seed)))


# Unequal micro-batch sizes: 1 to 32 real rows of 32.
SIZES = (1, 3, 32, 8, 17, 2, 30, 5)


def test_in_step_closed_form():
  est = in_step_estimate(k=8, rows=16, windows=500)
  assert int(est.windows) == 500 and float(est.batch_size) == 128.0
  np.testing.assert_allclose(float(est.b_simple), B_SIMPLE, rtol=0.05)
  np.testing.assert_allclose(float(est.trace_cov), TRACE, rtol=0.05)
  np.testing.assert_allclose(float(est.grad_sq), GRAD_SQ, rtol=0.05)


def test_in_step_unequal_weights_closed_form():
  # weight_fn: a micro-batch counts its real rows (a pre-weighted gradient).
  est = in_step_estimate(k=8, rows=32, windows=500, sizes=SIZES)
  assert float(est.batch_size) == sum(SIZES)
  np.testing.assert_allclose(float(est.b_simple), B_SIMPLE, rtol=0.05)
  np.testing.assert_allclose(float(est.trace_cov), TRACE, rtol=0.05)


def _naive_b_simple(sizes):
  """What the plain mean of the squared norms with ``B_small = B / n`` gives
  in expectation: off for unequal sizes (the test above would catch it)."""
  n, big = len(sizes), sum(sizes)
  small_sq = GRAD_SQ + TRACE * np.mean(1.0 / np.asarray(sizes))
  big_sq = GRAD_SQ + TRACE / big
  return (big * (small_sq - big_sq) / (n - 1)) / ((n * big_sq - small_sq)
                                                  / (n - 1))


def test_unequal_sizes_need_the_weighting():
  assert abs(_naive_b_simple(SIZES) / B_SIMPLE - 1) > 0.5


def test_cross_step_closed_form():
  k, rows, windows = 8, 32, 500
  tx = accum_jax.accumulate(optax.sgd(0.0), k, track_noise_scale=True,
                            noise_scale_decay=0.999)
  tx_unit = accum_jax.accumulate(optax.sgd(0.0), k, track_noise_scale=True,
                                 noise_scale_decay=0.999)

  def micro(batch, j):  # rows j, j + k, ...
    return jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:])[:, j], batch)

  @jax.jit
  def run(key):
    def window(i, states):
      batch = regression_batch(jax.random.fold_in(key, i), rows, k, SIZES)
      full = regression_batch(jax.random.fold_in(key, -i - 1), 16, k)

      def one(j, states):
        state, unit = states
        mb = micro(batch, j)
        # weight=: a micro-batch counts its weight (real rows)
        _, state = tx.update(jax.grad(half_mse)(W, mb), state, W,
                             weight=real_rows(mb))
        # no weight: a micro-batch counts 1, so b_simple is in micro-batches
        _, unit = tx_unit.update(jax.grad(half_mse)(W, micro(full, j)), unit,
                                 W)
        return state, unit
      return jax.lax.fori_loop(0, k, one, states)
    return jax.lax.fori_loop(0, windows, window,
                             (tx.init(W), tx_unit.init(W)))

  state, unit = run(jax.random.key(1))
  est, est_unit = accum_jax.noise_scale(state), accum_jax.noise_scale(unit)
  assert int(est.windows) == windows and float(est.batch_size) == sum(SIZES)
  np.testing.assert_allclose(float(est.b_simple), B_SIMPLE, rtol=0.05)
  assert float(est_unit.batch_size) == k
  np.testing.assert_allclose(float(est_unit.b_simple) * 16, B_SIMPLE,
                             rtol=0.05)


_grad = jax.jit(jax.grad(half_mse))


def reference_estimates(batches, k, decay, weighted):
  """A hand-written estimator: each micro-batch's gradient by jax.grad on its
  real rows, the window's unbiased estimates, bias-corrected EMAs."""
  ema_g = ema_s = ema_w = 0.0
  for batch in batches:
    grads, sizes = [], []
    for j in range(k):
      mb = jax.tree.map(lambda x, j=j: np.asarray(x)[j::k], batch)
      size = float(np.sum(mb['mask'])) if weighted else len(mb['mask'])
      if size > 0:
        grads.append(np.asarray(_grad(W, mb), np.float64))
        sizes.append(size)
    n, big = len(sizes), sum(sizes)
    if n < 2:
      continue
    mean = sum(b * g for b, g in zip(sizes, grads)) / big
    small_sq = sum(b * g @ g for b, g in zip(sizes, grads)) / big
    big_sq = mean @ mean
    g_est = (n * big_sq - small_sq) / (n - 1)
    s_est = big * (small_sq - big_sq) / (n - 1)
    ema_g = decay * ema_g + (1 - decay) * g_est
    ema_s = decay * ema_s + (1 - decay) * s_est
    ema_w = decay * ema_w + (1 - decay)
  return ema_s / ema_g, ema_s / ema_w, ema_g / ema_w


@pytest.mark.parametrize('weighted', [False, True])
def test_matches_hand_written_estimator(weighted):
  k, rows, decay = 4, 8, 0.7
  sizes = [(8, 2, 5, 1), (3, 0, 0, 0), (0, 6, 6, 7)]  # window 2: one piece
  batches = [regression_batch(jax.random.key(10 + i), rows, k, s)
             for i, s in enumerate(sizes)]
  want = reference_estimates(batches, k, decay, weighted)
  tx = accum_jax.accumulate(optax.sgd(0.1), k, track_noise_scale=True,
                            noise_scale_decay=decay)
  loss = half_mse if weighted else (
      lambda w, b: 0.5 * jnp.mean((b['x'] @ w - b['y']) ** 2))
  if not weighted:
    batches = [dict(b, mask=jnp.ones_like(b['mask'])) for b in batches]
    want = reference_estimates(batches, k, decay, weighted)
  step = jax.jit(accum_jax.value_and_update(
      loss, tx, weight_fn=real_rows if weighted else None))
  state, cross = tx.init(W), tx.init(W)
  cross_step = jax.jit(tx.update)
  for batch in batches:
    state = step(W, state, batch)[2]
    for j in range(k):
      mb = jax.tree.map(lambda x, j=j: x[j::k], batch)
      _, cross = cross_step(jax.grad(loss)(W, mb), cross, W,
                            weight=real_rows(mb) if weighted else None)
  expected_windows = 2 if weighted else 3
  # Cross-step without weight= a micro-batch counts 1, not its 8 rows.
  unit = 1 if weighted else rows
  for got, scale in ((accum_jax.noise_scale(state), 1),
                     (accum_jax.noise_scale(cross), unit)):
    assert int(got.windows) == expected_windows
    np.testing.assert_allclose(
        [float(got.b_simple) * scale, float(got.trace_cov) * scale,
         float(got.grad_sq)], want, rtol=2e-4)


def mlp_loss(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return 0.5 * jnp.mean(jnp.sum((h @ params['w2'] - batch['y']) ** 2, -1))


def mlp_data(key, n):
  kx, ke = jax.random.split(key)
  x = jax.random.normal(kx, (n, 6))
  y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1)
  return {'x': x, 'y': y + 0.3 * jax.random.normal(ke, y.shape)}


def test_mlp_agrees_with_direct_estimate():
  rng = np.random.default_rng(0)
  params = {'w1': jnp.asarray(rng.normal(size=(6, 16)) / np.sqrt(6),
                              jnp.float32),
            'b1': jnp.zeros(16),
            'w2': jnp.asarray(rng.normal(size=(16, 2)) / 4, jnp.float32)}
  # Direct: 1000 independent gradients of batches of 64, at the same point.
  m, b = 1000, 64
  batches = mlp_data(jax.random.key(1), m * b)
  grads = jax.jit(jax.vmap(lambda x, y: jax.flatten_util.ravel_pytree(
      jax.grad(mlp_loss)(params, {'x': x, 'y': y}))[0]))(
          batches['x'].reshape(m, b, 6), batches['y'].reshape(m, b, 2))
  grads = np.asarray(grads, np.float64)
  mean = grads.mean(0)
  trace = b * np.sum(grads.var(0, ddof=1))  # per example
  grad_sq = mean @ mean - trace / (m * b)
  direct = trace / grad_sq

  tx = accum_jax.accumulate(optax.sgd(0.0), 8, track_noise_scale=True,
                            noise_scale_decay=0.998)
  step = accum_jax.value_and_update(mlp_loss, tx)

  @jax.jit
  def run(key):
    def body(i, state):
      return step(params, state, mlp_data(jax.random.fold_in(key, i), 128))[2]
    return jax.lax.fori_loop(0, 400, body, tx.init(params))

  est = accum_jax.noise_scale(run(jax.random.key(2)))
  assert 5 < direct < 500  # a regime where batch size matters
  np.testing.assert_allclose(float(est.b_simple), direct, rtol=0.1)
  np.testing.assert_allclose(float(est.trace_cov), trace, rtol=0.05)


def test_adaptive_num_microbatches():
  def est(b, windows=50, trace=1.0):
    return accum_jax.NoiseScale(jnp.float32(b), jnp.float32(trace),
                                jnp.float32(trace / b), jnp.int32(windows),
                                jnp.float32(64.0))

  pick = accum_jax.adaptive_num_microbatches
  assert [int(pick(est(b), 16, 8)) for b in (1, 16, 17, 100, 1e6)] == [
      1, 1, 2, 7, 8]
  assert int(pick(est(100, windows=3), 16, 8)) == 8  # warm-up: the maximum
  assert int(pick(est(100, windows=3), 16, 8, warmup_microbatches=2)) == 2
  assert int(pick(est(1.0), 16, 8, min_microbatches=2)) == 2
  assert int(pick(est(-5.0), 16, 8)) == 8  # |G|^2 <= 0: noise dominates
  assert int(pick(est(-5.0, trace=-1.0), 16, 8)) == 1
  nan = accum_jax.NoiseScale(*(jnp.float32(jnp.nan),) * 3, jnp.int32(0),
                             jnp.float32(jnp.nan))
  assert int(pick(nan, 16, 8, warmup_windows=0)) == 8
  with pytest.raises(ValueError, match='min_microbatches'):
    pick(est(10), 16, 4, min_microbatches=5)


def test_one_compiled_step_runs_every_k():
  k, rows = 8, 4
  tx = accum_jax.accumulate(optax.sgd(0.0), k, track_noise_scale=True,
                            noise_scale_decay=0.5)
  traces = []

  def step(state, batch, r):
    traces.append(1)
    return accum_jax.value_and_update(
        lambda w, b: 0.5 * jnp.mean((b['x'] @ w - b['y']) ** 2), tx)(
            W, state, batch, num_real_microbatches=r)[2]

  step = jax.jit(step)
  state = tx.init(W)
  for i, r in enumerate((8, 3, 1, 5)):
    batch = regression_batch(jax.random.key(i), rows, k)
    state = step(state, batch, jnp.int32(r))
    window = state.noise.window  # reset at the end of each step
    assert float(window.pieces) == 0.0
    if r > 1:
      assert float(state.noise.batch_size) == r * rows
  assert len(traces) == 1
  assert int(state.noise.windows) == 3  # the window of one piece gave none


def one_window_reference(k=4, rows=8):
  """A batch of k micro-batches, a tracking transform, and the estimate of
  value_and_update after that one window (the helpers' reference)."""
  batch = regression_batch(jax.random.key(3), rows, k)
  batch = {'x': batch['x'], 'y': batch['y']}
  tx = accum_jax.accumulate(optax.sgd(0.0), k, track_noise_scale=True,
                            noise_scale_decay=0.5)

  def loss(w, b):
    return 0.5 * jnp.mean((b['x'] @ w - b['y']) ** 2)

  want = accum_jax.noise_scale(jax.jit(accum_jax.value_and_update(loss, tx))(
      W, tx.init(W), batch)[2])
  assert int(want.windows) == 1
  return batch, tx, want


def test_flax_and_equinox_helpers_track_it():
  nn = pytest.importorskip('flax.linen')
  eqx = pytest.importorskip('equinox')
  from flax.training import train_state
  batch, tx, want = one_window_reference()

  dense = nn.Dense(1, use_bias=False)
  params = {'params': {'kernel': W[:, None]}}
  state = train_state.TrainState.create(apply_fn=dense.apply,
                                        params=params['params'], tx=tx)

  def linen_loss(p, b):
    return 0.5 * jnp.mean((dense.apply({'params': p}, b['x'])[:, 0]
                           - b['y']) ** 2)

  state, _ = jax.jit(lambda s, b: accum_jax.linen_train_step(
      s, b, linen_loss))(state, batch)
  got = accum_jax.noise_scale(state)  # a TrainState holding the state

  model = eqx.nn.Linear(D, 1, use_bias=False, key=jax.random.key(0))
  model = eqx.tree_at(lambda m: m.weight, model, W[None, :])
  opt_state = tx.init(eqx.filter(model, eqx.is_array))

  def eqx_loss(m, b):
    return 0.5 * jnp.mean((jax.vmap(m)(b['x'])[:, 0] - b['y']) ** 2)

  _, _, opt_state = eqx.filter_jit(accum_jax.filter_value_and_update(
      eqx_loss, tx))(model, opt_state, batch)
  for est in (got, accum_jax.noise_scale(opt_state)):
    np.testing.assert_allclose(np.asarray(est[:3]), np.asarray(want[:3]),
                               rtol=1e-5)


def test_checkpoint_round_trip():
  serialization = pytest.importorskip('flax.serialization')
  k, rows = 4, 8
  tx = accum_jax.accumulate(optax.adam(1e-2), k, track_noise_scale=True,
                            noise_scale_decay=0.5)
  step = jax.jit(accum_jax.value_and_update(
      lambda w, b: 0.5 * jnp.mean((b['x'] @ w - b['y']) ** 2), tx))
  batches = [regression_batch(jax.random.key(i), rows, k) for i in range(4)]
  state = tx.init(W)
  for b in batches[:2]:
    state = step(W, state, b)[2]
  pickled = pickle.loads(pickle.dumps(jax.device_get(state)))
  restored = serialization.from_bytes(tx.init(W),
                                      serialization.to_bytes(state))
  outs = []
  for s in (state, pickled, restored):
    for b in batches[2:]:
      s = step(W, s, b)[2]
    outs.append(np.asarray(accum_jax.noise_scale(s)[:3]))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])


def test_errors():
  tx = accum_jax.accumulate(optax.sgd(0.1), 2, track_noise_scale=True)
  plain = accum_jax.accumulate(optax.sgd(0.1), 2)
  with pytest.raises(ValueError, match='track_noise_scale=True'):
    accum_jax.noise_scale(plain.init(W))
  with pytest.raises(ValueError, match='track_noise_scale=False'):
    plain.update(W, tx.init(W), W)
  with pytest.raises(ValueError, match='track_noise_scale=True'):
    tx.update(W, plain.init(W), W)
  with pytest.raises(TypeError, match='AccumulateState'):
    accum_jax.noise_scale({'a': 1})
  with pytest.raises(ValueError, match='noise_scale_decay'):
    accum_jax.accumulate(optax.sgd(0.1), 2, noise_scale_decay=1.0)
  with pytest.raises(TypeError, match='track_noise_scale must be a bool'):
    accum_jax.accumulate(optax.sgd(0.1), 2, track_noise_scale=1)
  est = accum_jax.noise_scale(tx.init(W))  # no window yet: NaN
  assert int(est.windows) == 0 and np.isnan(float(est.b_simple))


def test_skipped_windows_leave_the_estimate():
  k, rows = 4, 8
  tx = accum_jax.accumulate(optax.sgd(0.0), k, track_noise_scale=True,
                            nonfinite='skip_step')
  step = jax.jit(accum_jax.value_and_update(
      lambda w, b: 0.5 * jnp.mean((b['x'] @ w - b['y']) ** 2), tx))
  state = step(W, tx.init(W), regression_batch(jax.random.key(0), rows, k))[2]
  before = np.asarray(accum_jax.noise_scale(state)[:3])
  bad = regression_batch(jax.random.key(1), rows, k)
  bad['y'] = bad['y'].at[2].set(jnp.nan)
  state = step(W, state, bad)[2]
  assert int(state.skipped_steps) == 1 and int(state.noise.windows) == 1
  np.testing.assert_array_equal(np.asarray(accum_jax.noise_scale(state)[:3]),
                                before)
  assert float(state.noise.window.pieces) == 0.0


@pytest.fixture(scope='module')
def mesh_results():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, str(HERE / 'noise_scale_worker.py')], env=env,
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout)


NONE = {'all-reduce': 0, 'reduce-scatter': 0, 'all-gather': 0,
        'all-to-all': 0, 'collective-permute': 0}


@pytest.mark.parametrize('name', ['rows', 'weighted', 'fsdp_per_step'])
def test_mesh_matches_one_device_pieces(mesh_results, name):
  record = mesh_results[name]
  np.testing.assert_allclose(record['got'], record['want'], rtol=1e-4)
  # The squared norms ride the step's reduction: nothing new in the loop,
  # and no more collectives after it than without tracking (with sharded
  # parameters the mean's squared norm joins the combined all-reduce).
  assert record['counts']['inside'] == NONE
  if mesh_results['combines_all_reduces']:
    assert record['counts'] == record['counts_off']
    return
  # XLA:CPU of jaxlib 0.7.0 leaves one all-reduce per reduced array: the
  # squared norms add theirs, after the loop; nothing else changes.
  on, off = record['counts']['outside'], record['counts_off']['outside']
  assert on['all-reduce'] > off['all-reduce']
  assert {**on, 'all-reduce': 0} == {**off, 'all-reduce': 0}
  assert record['counts_off']['inside'] == NONE


def test_mesh_fsdp_per_microbatch_refuses(mesh_results):
  assert "fsdp_reduce='per_step'" in mesh_results['fsdp_error']


def test_adaptive_example_compiles_once(tmp_path):
  pytest.importorskip('sklearn')
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'accum_jax_example_adaptive_batch',
      HERE.parent / 'examples' / 'adaptive_batch.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / 'adaptive.png'
  results = module.main(['--examples', '2000', '--max-k', '8',
                         '--out', str(out)])
  assert results['traces'] == 1
  ks = results['history']['adaptive k (from b_simple)']['k']
  assert set(ks) <= set(range(2, 9)) and len(set(ks)) > 1
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_nnx_optimizer_tracks_it():
  """nnx_train_step and an nnx.Optimizer's cross-step updates both carry the
  estimate; noise_scale reads it through nnx.as_pure(optimizer.opt_state)."""
  pytest.importorskip('flax', minversion='0.12.7')
  from flax import nnx
  k, rows = 4, 8
  batch, tx, want = one_window_reference(k, rows)

  def make():
    model = nnx.Linear(D, 1, use_bias=False, rngs=nnx.Rngs(0))
    model.kernel.value = W[:, None]
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  def nnx_loss(m, b):
    return 0.5 * jnp.mean((m(b['x'])[:, 0] - b['y']) ** 2)

  model, optimizer = make()
  nnx.jit(lambda m, o, b: accum_jax.nnx_train_step(m, o, b, nnx_loss))(
      model, optimizer, batch)
  in_step = accum_jax.noise_scale(nnx.as_pure(optimizer.opt_state))

  model, optimizer = make()  # cross-step: k calls of optimizer.update

  @nnx.jit
  def micro_step(model, optimizer, mb):
    grads = nnx.grad(nnx_loss)(model, mb)
    optimizer.update(model, grads)

  for j in range(k):
    micro_step(model, optimizer, jax.tree.map(lambda x, j=j: x[j::k], batch))
  cross = accum_jax.noise_scale(nnx.as_pure(optimizer.opt_state))
  np.testing.assert_allclose(np.asarray(in_step[:3]), np.asarray(want[:3]),
                             rtol=1e-5)
  # Cross-step without weight= a micro-batch counts 1, not its rows.
  assert int(cross.windows) == 1 and float(cross.batch_size) == k
  np.testing.assert_allclose(
      [float(cross.b_simple) * rows, float(cross.trace_cov) * rows,
       float(cross.grad_sq)], np.asarray(want[:3]), rtol=1e-5)
