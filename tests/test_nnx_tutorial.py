"""The Flax NNX MNIST tutorial's training step with nnx_train_step.

The tutorial's CNN (BatchNorm, and dropout drawing from an ``nnx.Rngs``
passed at call time), its ``loss_fn(model, rngs, batch)`` and its
``train_step`` are written out below, on scikit-learn's bundled 8x8 digits
(no download), so ``linear1`` takes ``64 * 2 * 2`` features instead of
``64 * 7 * 7``. The accum_jax version of ``train_step`` changes these lines of
the tutorial's (``test_changed_lines`` counts them):

* ``optax.adamw(learning_rate, momentum)`` becomes
  ``accum_jax.accumulate(optax.adamw(learning_rate, momentum), K)`` where the
  optimizer is built (outside ``train_step``);
* ``grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)``,
  ``(loss, logits), grads = grad_fn(model, rngs, batch)`` and
  ``optimizer.update(model, grads)`` become one statement,
  ``loss, logits = accum_jax.nnx_train_step(model, optimizer, batch,
  loss_fn, rngs, batch_argnums=2, has_aux=True, aux='stack')`` (two lines
  as formatted);
* ``metrics.update(...)`` takes the labels split like the stacked logits,
  ``labels=accum_jax.split_batch(batch['label'], K)``: the per-row logits
  come back as ``(K, B / K, 10)``.

The same step is checked against a hand-written loop of ``K`` sequential
``nnx.value_and_grad`` calls drawing from the same ``nnx.Rngs`` (dropout on,
BatchNorm on), and against the tutorial's full-batch step (dropout off,
BatchNorm off, where the two compute the same thing).
"""

import difflib
import inspect
import json
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip('flax', minversion='0.12.7')  # nnx_train_step's floor

from flax import nnx
from sklearn.datasets import load_digits

import accum_jax
from tests import _helpers

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

K = 4
B = 32
LEARNING_RATE = 0.005
MOMENTUM = 0.9


def digits_batches(num_batches, seed=0):
  """``num_batches`` shuffled batches of ``B`` digits, ``(B, 8, 8, 1)``."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  order = np.random.default_rng(seed).permutation(len(images))
  return [{'image': images[order[i * B:(i + 1) * B]],
           'label': digits.target[order[i * B:(i + 1) * B]].astype(np.int32)}
          for i in range(num_batches)]


class CNN(nnx.Module):
  """The tutorial's CNN; BatchNorm optional, input 8x8."""

  def __init__(self, *, rngs: nnx.Rngs, batch_norm=True, dropout=0.025):
    identity = lambda x: x  # noqa: E731
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = (nnx.BatchNorm(32, rngs=rngs) if batch_norm
                        else identity)
    self.dropout1 = nnx.Dropout(rate=dropout)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = (nnx.BatchNorm(64, rngs=rngs) if batch_norm
                        else identity)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(64 * 2 * 2, 256, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=dropout)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    x = self.linear2(x)
    return x


def loss_fn(model: CNN, rngs: nnx.Rngs, batch):
  logits = model(batch['image'], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits=logits, labels=batch['label']
  ).mean()
  return loss, logits


# The tutorial's train_step, as published (only the function's name differs).
@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, rngs: nnx.Rngs, batch):
  """Train for a single step."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, rngs, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
  optimizer.update(model, grads)  # In-place updates.


# The same step with accum_jax (optimizer built with accum_jax.accumulate).
@nnx.jit
def accum_train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, rngs: nnx.Rngs, batch):
  """Train for a single step."""
  loss, logits = accum_jax.nnx_train_step(
    model, optimizer, batch, loss_fn, rngs, batch_argnums=2, has_aux=True, aux='stack')
  metrics.update(loss=loss, logits=logits, labels=accum_jax.split_batch(batch['label'], K))  # In-place updates.


@nnx.jit
def sequential_step(model, optimizer, rngs, batch):
  """The reference: K sequential nnx.value_and_grad calls on micro-batches
  ``j::K``, the model's BatchNorm statistics and ``rngs`` advancing in place,
  then one update with the mean gradient."""
  losses, logits, grads = [], [], []
  for j in range(K):
    microbatch = jax.tree.map(lambda x: x[j::K], batch)
    (loss, lg), g = nnx.value_and_grad(loss_fn, has_aux=True)(
        model, rngs, microbatch)
    losses.append(loss)
    logits.append(lg)
    grads.append(g)
  optimizer.update(model, jax.tree.map(lambda *g: sum(g) / K, *grads))
  return sum(losses) / K, jnp.stack(logits)


def new_metrics():
  return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                         loss=nnx.metrics.Average('loss'))


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  _helpers.assert_trees_close(nnx.as_pure(a), nnx.as_pure(b), rtol=rtol,
                              atol=atol)


def rng_state(rngs):
  return [(int(s.count[...]), np.asarray(jax.random.key_data(s.key[...])))
          for s in (rngs.default, rngs.dropout)]


def test_changed_lines():
  """The accum_jax train_step differs from the tutorial's in 3 lines of
  code: the two lines of the nnx_train_step call replace the tutorial's
  grad_fn, value_and_grad and optimizer.update lines, and the metrics line
  takes split labels."""
  def code(fn):
    lines = inspect.getsource(fn).splitlines()[2:]  # after the decorator, def
    return [line.split('#')[0].rstrip() for line in lines]

  diff = [line for line in difflib.ndiff(code(train_step),
                                         code(accum_train_step))
          if line[:2] in ('- ', '+ ')]
  added = [line for line in diff if line.startswith('+ ')]
  removed = [line for line in diff if line.startswith('- ')]
  assert len(added) == 3, diff
  assert len(removed) == 4, diff


def test_tutorial_step_matches_sequential_microbatches():
  """Dropout on (rate 0.2), BatchNorm on: the same numbers as K sequential
  micro-batch calls drawing from the same Rngs, and the Rngs advanced as far
  (2 dropout draws per micro-batch)."""
  model = CNN(rngs=nnx.Rngs(0), dropout=0.2)
  ref = CNN(rngs=nnx.Rngs(0), dropout=0.2)
  # SGD, not the tutorial's adamw: the biases of the convolutions feeding
  # BatchNorm have a gradient that is 0 in exact arithmetic, and Adam scales
  # its rounding noise (1e-9) up to the learning rate, differently for any
  # two summation orders.
  tx = optax.sgd(0.1, MOMENTUM)
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(tx, K),
                            wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)
  metrics = new_metrics()
  rngs, ref_rngs = nnx.Rngs(0), nnx.Rngs(0)
  step = nnx.jit(lambda m, o, r, b: accum_jax.nnx_train_step(
      m, o, b, loss_fn, r, batch_argnums=2, has_aux=True, aux='stack'))
  for i, batch in enumerate(digits_batches(3)):
    loss, logits = step(model, optimizer, rngs, batch)
    ref_loss, ref_logits = sequential_step(ref, ref_opt, ref_rngs, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert_trees_close(nnx.state(model), nnx.state(ref))
    assert rng_state(rngs)[1][0] == 2 * K * (i + 1)
    jax.tree.map(np.testing.assert_array_equal, rng_state(rngs),
                 rng_state(ref_rngs))
  assert int(optimizer.step[...]) == 3
  accum_train_step(model, optimizer, metrics, rngs, batch)
  assert 0.0 <= float(metrics.compute()['accuracy']) <= 1.0
  assert rng_state(rngs)[1][0] == 2 * K * 4


def test_dropout_masks_differ_per_microbatch():
  """The same rows in every micro-batch: with one shared key their dropped
  units (zeros after dropout2) would coincide."""
  model = CNN(rngs=nnx.Rngs(0), batch_norm=False, dropout=0.5)
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.0), K),
                            wrt=nnx.Param)
  batch = digits_batches(1)[0]
  same = jax.tree.map(lambda x: jnp.repeat(x[:B // K], K, axis=0), batch)

  def loss_and_mask(model, rngs, batch):
    loss, _ = loss_fn(model, rngs, batch)
    return loss, model.dropout2(jnp.ones((batch['image'].shape[0], 64)),
                                rngs=rngs)

  _, masks = nnx.jit(lambda m, o, r, b: accum_jax.nnx_train_step(
      m, o, b, loss_and_mask, r, batch_argnums=2, has_aux=True, aux='stack'))(
          model, optimizer, nnx.Rngs(0), same)
  masks = np.asarray(masks) > 0
  assert masks.shape == (K, B // K, 64)
  for j in range(1, K):
    assert (masks[j] != masks[0]).mean() > 0.3


def test_tutorial_step_matches_full_batch_without_dropout():
  """Dropout off and no BatchNorm: accum_train_step gives the tutorial's
  full-batch train_step's parameters and metrics."""
  model = CNN(rngs=nnx.Rngs(0), batch_norm=False, dropout=0.0)
  ref = CNN(rngs=nnx.Rngs(0), batch_norm=False, dropout=0.0)
  optimizer = nnx.Optimizer(
      model, accum_jax.accumulate(optax.adamw(LEARNING_RATE, MOMENTUM), K),
      wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, optax.adamw(LEARNING_RATE, MOMENTUM),
                          wrt=nnx.Param)
  metrics, ref_metrics = new_metrics(), new_metrics()
  rngs, ref_rngs = nnx.Rngs(0), nnx.Rngs(0)
  for batch in digits_batches(3, seed=1):
    accum_train_step(model, optimizer, metrics, rngs, batch)
    train_step(ref, ref_opt, ref_metrics, ref_rngs, batch)
    # Adam moves a parameter of near-zero gradient by up to the learning
    # rate (5e-3) whatever the rounding: 2e-5 absolute allows for that.
    assert_trees_close(nnx.state(model, nnx.Param),
                       nnx.state(ref, nnx.Param), atol=2e-5)
  got, want = metrics.compute(), ref_metrics.compute()
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5)
  assert float(got['accuracy']) == float(want['accuracy'])
  assert int(optimizer.step[...]) == int(ref_opt.step[...]) == 3


def test_rngs_as_keyword_shared_with_the_model():
  """An Rngs passed by keyword that the model also holds is threaded once:
  the model's dropout and the loss's noise draw from the same object, in
  order, and the Rngs comes back advanced by every micro-batch's draws."""

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(64, 10, rngs=rngs)
      self.dropout = nnx.Dropout(0.5)
      self.rngs = rngs  # the same object the step is given

    def __call__(self, x):
      return self.linear(self.dropout(x, rngs=self.rngs))

  def loss(model, batch, *, rngs):
    x = batch['image'].reshape(batch['image'].shape[0], -1)
    logits = model(x + jax.random.normal(rngs.noise(), x.shape) * 0.1)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()

  rngs = nnx.Rngs(0, dropout=1, noise=2)
  ref_rngs = nnx.Rngs(0, dropout=1, noise=2)
  model, ref = Net(rngs), Net(ref_rngs)
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.5), K),
                            wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, optax.sgd(0.5), wrt=nnx.Param)

  # nnx.grad refuses an Rngs that is both in the model and an argument
  # ('Inconsistent aliasing'): the reference reaches it through the model.
  @nnx.jit
  def ref_step(model, optimizer, batch):
    via_model = lambda m, b: loss(m, b, rngs=m.rngs)  # noqa: E731
    grads = [nnx.grad(via_model)(model, jax.tree.map(lambda x: x[j::K], batch))
             for j in range(K)]
    optimizer.update(model, jax.tree.map(lambda *g: sum(g) / K, *grads))

  step = nnx.jit(lambda m, o, r, b: accum_jax.nnx_train_step(
      m, o, b, loss, rngs=r))
  for batch in digits_batches(2, seed=2):
    step(model, optimizer, rngs, batch)
    ref_step(ref, ref_opt, batch)
  assert_trees_close(nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param))
  assert model.rngs is rngs
  for name in ('dropout', 'noise'):
    assert int(getattr(rngs, name).count[...]) == 2 * K
    assert int(getattr(ref_rngs, name).count[...]) == 2 * K


def test_batch_argnum_out_of_range():
  model = CNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.1), K),
                            wrt=nnx.Param)
  with pytest.raises(ValueError, match='batch_argnums=3.*from 1 to 2'):
    accum_jax.nnx_train_step(model, optimizer, digits_batches(1)[0], loss_fn,
                             nnx.Rngs(0), batch_argnums=3)


_MESH_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from flax import nnx
import flax.linen as nn
from flax.training import train_state
import accum_jax
from accum_jax import _compat
from benchmarks import hlo

k = 4
mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
x = jax.random.normal(jax.random.key(0), (64, 16))
batch = {'x': x, 'y': jnp.sin(x[:, :1])}
out = {}
with _compat.set_mesh(mesh):
  bs = jax.device_put(batch, NamedSharding(mesh, P('data')))

  def nnx_loss(model, b):
    return jnp.mean((model(b['x']) - b['y']) ** 2)

  model, ref = nnx.Linear(16, 1, rngs=nnx.Rngs(0)), nnx.Linear(
      16, 1, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, accum_jax.accumulate(optax.adam(1e-2), k),
                      wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)
  step = nnx.jit(lambda m, o, b: accum_jax.nnx_train_step(
      m, o, b, nnx_loss, axis_name='data'))
  ref_step = nnx.jit(lambda m, o, b: o.update(
      m, nnx.grad(nnx_loss)(m, b)))
  for _ in range(2):
    step(model, opt, bs)
    ref_step(ref, ref_opt, batch)
  graphdef, state = nnx.split((model, opt))
  compiled = jax.jit(lambda s, b: accum_jax.nnx_train_step(
      *nnx.merge(graphdef, s), b, nnx_loss, axis_name='data')).lower(
          state, bs).compile()
  out['nnx'] = {
      'got': np.asarray(model.kernel[...]).tolist(),
      'want': np.asarray(ref.kernel[...]).tolist(),
      'counts': hlo.count_collectives(compiled, mesh, 'data')}

  dense = nn.Dense(1)
  params = dense.init(jax.random.key(1), x[:1])['params']

  def linen_loss(p, b):
    return jnp.mean((dense.apply({'params': p}, b['x']) - b['y']) ** 2)

  st = train_state.TrainState.create(
      apply_fn=dense.apply, params=params,
      tx=accum_jax.accumulate(optax.adam(1e-2), k))
  ref_st = train_state.TrainState.create(apply_fn=dense.apply, params=params,
                                         tx=optax.adam(1e-2))
  lstep = jax.jit(lambda s, b: accum_jax.linen_train_step(
      s, b, linen_loss, axis_name='data'))
  for _ in range(2):
    st, _ = lstep(st, bs)
    ref_st = ref_st.apply_gradients(grads=jax.grad(linen_loss)(
        ref_st.params, batch))
  out['linen'] = {
      'got': np.asarray(st.params['kernel']).tolist(),
      'want': np.asarray(ref_st.params['kernel']).tolist(),
      'counts': hlo.count_collectives(lstep.lower(st, bs).compile(), mesh,
                                      'data')}

# FSDP of an NNX model computing in bf16 (Explicit axes): its parameters are
# gathered in bf16, with the numbers of gathering f32 (detection off).
from accum_jax import _casts
emesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 64, dtype=jnp.bfloat16, rngs=rngs)
    self.l2 = nnx.Linear(64, 8, dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x))).astype(jnp.float32)


def mlp_loss(model, b):
  return jnp.mean((model(b['x']) - b['y8']) ** 2)


FSDP = {(16, 64): P(None, 'data'), (64,): P('data'), (64, 8): P('data'),
        (8,): P('data')}
batch8 = {'x': x, 'y8': jnp.sin(x[:, :8])}


def fsdp_train(detect):
  with _compat.set_mesh(emesh):
    m = MLP(nnx.Rngs(0))
    nnx.update(m, jax.tree.map(lambda a: jax.device_put(
        a, NamedSharding(emesh, FSDP[a.shape])), nnx.state(m)))
    o = nnx.Optimizer(m, accum_jax.accumulate(optax.sgd(0.1), k),
                      wrt=nnx.Param)
    b = jax.device_put(batch8, NamedSharding(emesh, P('data')))
    saved = _casts.cast_dtypes
    if not detect:
      _casts.cast_dtypes = lambda fn, p, *a, **kw: [None] * len(
          jax.tree.leaves(p))
    try:
      f = nnx.jit(lambda m, o, b: accum_jax.nnx_train_step(m, o, b, mlp_loss))
      for _ in range(2):
        f(m, o, b)
      graphdef, state = nnx.split((m, o))
      text = jax.jit(lambda s, b: accum_jax.nnx_train_step(
          *nnx.merge(graphdef, s), b, mlp_loss)).lower(state, b).compiler_ir(
              'hlo').as_hlo_text()
    finally:
      _casts.cast_dtypes = saved
    params = nnx.state(m, nnx.Param)
    return ([np.asarray(a).tolist() for a in jax.tree.leaves(params)],
            [str(a.sharding.spec) for a in jax.tree.leaves(params)],
            hlo.collective_dtypes(text, 'all-gather'))


ref = MLP(nnx.Rngs(0))
ref_opt = nnx.Optimizer(ref, optax.sgd(0.1), wrt=nnx.Param)
for _ in range(2):
  ref_opt.update(ref, nnx.grad(mlp_loss)(ref, batch8))
got, specs, gathers = fsdp_train(True)
f32, _, f32_gathers = fsdp_train(False)
out['nnx_fsdp'] = {
    'got': got, 'f32': f32, 'specs': specs, 'gathers': gathers,
    'f32_gathers': f32_gathers,
    'want': [np.asarray(a).tolist()
             for a in jax.tree.leaves(nnx.state(ref, nnx.Param))]}
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def mesh_results():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [root] + [p for p in [env.get('PYTHONPATH')] if p])
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  proc = subprocess.run([sys.executable, '-c', _MESH_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=480)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fsdp_of_a_bf16_model_gathers_its_parameters_in_bf16(mesh_results):
  """nnx_train_step on an Explicit mesh with FSDP-sharded parameters of a
  model computing in bf16 (nnx.Linear(dtype=bf16)): every parameter is
  all-gathered in bf16 (before optimization; XLA:CPU widens bf16
  collectives), the parameters stay sharded, and two steps equal those
  with f32 gathers bit for bit, and the full batch to bf16 rounding."""
  record = mesh_results['nnx_fsdp']
  assert record['gathers'] == {'bf16': 4}, record['gathers']
  assert record['f32_gathers'] == {'f32': 4}, record['f32_gathers']
  assert record['specs'] == ["P('data',)", "P(None, 'data')", "P('data',)",
                             "P('data', None)"]
  assert record['got'] == record['f32']
  for got, want in zip(record['got'], record['want'], strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2,
                               atol=2e-3)


@pytest.mark.parametrize('helper', ['nnx', 'linen'])
def test_axis_name_reaches_the_loop_on_an_auto_mesh(mesh_results, helper):
  """axis_name='data' on a mesh with Auto axes: two steps on 8 devices equal
  two full-batch steps, with no all-reduce inside the micro-batch loop."""
  record = mesh_results[helper]
  np.testing.assert_allclose(record['got'], record['want'], rtol=1e-5,
                             atol=1e-6)
  counts = record['counts']
  assert counts['inside']['all-reduce'] == 0, counts
  assert counts['outside']['all-reduce'] >= 1, counts
