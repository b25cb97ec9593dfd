# ruff: noqa: F722 (jaxtyping shape strings in annotations)
"""Equinox: filter_value_and_grad and filter_value_and_update.

The Equinox "CNN on MNIST" example's model, loss and ``make_step`` are
written out below as published, on scikit-learn's bundled 8x8 digits (no
download; so the first ``Linear`` takes ``3 * 4 * 4`` features instead of
``1728``), next to two accum_jax versions of ``make_step``
(``test_changed_lines`` counts the differences):

* ``make_step_grad``, 1 changed line: ``eqx.filter_value_and_grad(loss)``
  becomes ``accum_jax.filter_value_and_grad(loss, K)``. The optimizer stays
  ``optax.adamw(LEARNING_RATE)``; it is applied to the mean gradient of the
  ``K`` micro-batches.
* ``make_step_update``, 2 lines replace 4: the ``filter_value_and_grad``
  line and the 3 lines of ``optim.update(...)`` become one statement,
  ``loss_value, updates, opt_state = accum_jax.filter_value_and_update(
  loss, optim)(model, opt_state, x, y)``. Outside ``make_step`` one more
  line changes: ``optim = accum_jax.accumulate(optax.adamw(LEARNING_RATE),
  K)``; ``optim.init(eqx.filter(model, eqx.is_array))`` stays. The
  accumulator is the scan's carry: no gradient buffer besides it.

Both are checked against the example's full-batch ``make_step``.
"""

import difflib
import inspect
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxtyping import Array, Float, Int, PyTree
from sklearn.datasets import load_digits

import accum_jax
from tests._helpers import assert_trees_close

K = 4
BATCH_SIZE = 64
LEARNING_RATE = 3e-4
SEED = 5678


def digits_batches(num_batches, seed=0):
  """``(x, y)`` batches of 8x8 digits, channels first as in the example."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[:, None]
  order = np.random.default_rng(seed).permutation(len(images))
  return [(jnp.asarray(images[order[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]]),
           jnp.asarray(digits.target[order[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]]))
          for i in range(num_batches)]


# The example's model, loss and make_step (8x8 inputs: Linear(48, 512)).
class CNN(eqx.Module):
  layers: list

  def __init__(self, key):
    key1, key2, key3, key4 = jax.random.split(key, 4)
    self.layers = [
        eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
        eqx.nn.MaxPool2d(kernel_size=2),
        jax.nn.relu,
        jnp.ravel,
        eqx.nn.Linear(48, 512, key=key2),
        jax.nn.sigmoid,
        eqx.nn.Linear(512, 64, key=key3),
        jax.nn.relu,
        eqx.nn.Linear(64, 10, key=key4),
        jax.nn.log_softmax,
    ]

  def __call__(self, x: Float[Array, '1 8 8']) -> Float[Array, '10']:
    for layer in self.layers:
      x = layer(x)
    return x


def loss(
    model: CNN, x: Float[Array, 'batch 1 8 8'], y: Int[Array, ' batch']
) -> Float[Array, '']:
  pred_y = jax.vmap(model)(x)
  return cross_entropy(y, pred_y)


def cross_entropy(
    y: Int[Array, ' batch'], pred_y: Float[Array, 'batch 10']
) -> Float[Array, '']:
  pred_y = jnp.take_along_axis(pred_y, jnp.expand_dims(y, 1), axis=1)
  return -jnp.mean(pred_y)


def make_steps(optim):
  """The example's make_step (closing over ``optim``, as there) and the
  accum_jax version for the same plain optimizer."""

  @eqx.filter_jit
  def make_step(
      model: CNN,
      opt_state: PyTree,
      x: Float[Array, 'batch 1 8 8'],
      y: Int[Array, ' batch'],
  ):
    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    updates, opt_state = optim.update(
        grads, opt_state, eqx.filter(model, eqx.is_array)
    )
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  @eqx.filter_jit
  def make_step_grad(
      model: CNN,
      opt_state: PyTree,
      x: Float[Array, 'batch 1 8 8'],
      y: Int[Array, ' batch'],
  ):
    loss_value, grads = accum_jax.filter_value_and_grad(loss, K)(model, x, y)
    updates, opt_state = optim.update(
        grads, opt_state, eqx.filter(model, eqx.is_array)
    )
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  return make_step, make_step_grad


def make_update_step(optim):
  """The accum_jax version for ``optim = accum_jax.accumulate(...)``."""

  @eqx.filter_jit
  def make_step_update(
      model: CNN,
      opt_state: PyTree,
      x: Float[Array, 'batch 1 8 8'],
      y: Int[Array, ' batch'],
  ):
    loss_value, updates, opt_state = accum_jax.filter_value_and_update(
        loss, optim)(model, opt_state, x, y)
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  return make_step_update


def changed(a, b):
  """``(removed, added)`` code lines between two functions' bodies."""
  def body(fn):
    return inspect.getsource(fn).splitlines()[2:]  # after decorator and def

  diff = [line for line in difflib.ndiff(body(a), body(b))
          if line[:2] in ('- ', '+ ')]
  return ([line for line in diff if line[0] == '-'],
          [line for line in diff if line[0] == '+'])


def test_changed_lines():
  """make_step_grad: 1 line changed; make_step_update: 2 lines for 4 (the
  optimizer's definition, outside make_step, is 1 more)."""
  make_step, make_step_grad = make_steps(None)
  make_step_update = make_update_step(None)
  removed, added = changed(make_step, make_step_grad)
  assert (len(removed), len(added)) == (1, 1), (removed, added)
  assert 'accum_jax.filter_value_and_grad(loss, K)' in added[0]
  removed, added = changed(make_step, make_step_update)
  assert (len(removed), len(added)) == (4, 2), (removed, added)


def assert_models_close(a, b, atol):
  assert_trees_close(eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array),
                     rtol=1e-5, atol=atol)


@pytest.mark.parametrize('version', ['grad', 'update'])
def test_make_step_matches_full_batch(version):
  """Three adamw steps on digits batches of 64, K=4 micro-batches of 16: the
  full-batch step's losses and parameters."""
  model = CNN(jax.random.key(SEED))
  optim = optax.adamw(LEARNING_RATE)
  accum_optim = accum_jax.accumulate(optax.adamw(LEARNING_RATE), K)
  make_step, make_step_grad = make_steps(optim)
  step = make_step_grad if version == 'grad' else make_update_step(accum_optim)
  ref_state = optim.init(eqx.filter(model, eqx.is_array))
  opt_state = (ref_state if version == 'grad'
               else accum_optim.init(eqx.filter(model, eqx.is_array)))
  ref = model
  for x, y in digits_batches(3):
    model, opt_state, loss_value = step(model, opt_state, x, y)
    ref, ref_state, ref_value = make_step(ref, ref_state, x, y)
    np.testing.assert_allclose(loss_value, ref_value, rtol=1e-5)
    # Adam moves a parameter of near-zero gradient by up to the learning
    # rate (3e-4) whatever the rounding.
    assert_models_close(model, ref, atol=1e-6)
  if version == 'update':
    assert int(opt_state.count) == 0  # at a window boundary
    assert int(opt_state.inner_state[0].count) == 3


def test_arguments_static_leaves_and_rng():
  """argnums picks the batched arguments; a float, a function and a Python
  bool pass as static leaves; a model's integer array is not differentiated;
  rng= reaches micro-batch j as fold_in(rng, j)."""

  class Net(eqx.Module):
    linear: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    shift: jax.Array  # an integer array: static for the filter

    def __call__(self, x, *, key):
      return self.dropout(self.linear(x), key=key) + self.shift

  model = Net(eqx.nn.Linear(4, 3, key=jax.random.key(0)),
              eqx.nn.Dropout(0.5), jnp.arange(3))

  def loss_fn(model, scale, x, y, *, rng, act, train):
    keys = jax.random.split(rng, x.shape[0])
    out = jax.vmap(lambda xi, k: model(act(xi), key=k))(x, keys)
    out = out if train else out * 0
    err = jnp.mean((out - y) ** 2) * scale
    return err, {'rows': jnp.asarray(x.shape[0])}

  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jax.random.normal(jax.random.key(2), (8, 3))
  rng = jax.random.key(3)
  f = accum_jax.filter_value_and_grad(loss_fn, K, batch_argnums=(2, 3),
                                      has_aux=True)
  (value, aux), grads = eqx.filter_jit(f)(model, 2.0, x, y, rng=rng,
                                          act=jnp.tanh, train=True)
  ref_grads, values = [], []
  for j in range(K):
    (v, _), g = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, 2.0, x[j::K], y[j::K], rng=jax.random.fold_in(rng, j),
        act=jnp.tanh, train=True)
    values.append(v)
    ref_grads.append(g)
  np.testing.assert_allclose(value, sum(values) / K, rtol=1e-6)
  assert int(aux['rows']) == 8  # integer aux: summed over micro-batches
  mean = jax.tree.map(lambda *g: sum(g) / K, *ref_grads)
  np.testing.assert_allclose(grads.linear.weight, mean.linear.weight,
                             rtol=1e-5, atol=1e-7)
  assert grads.shift is None and grads.dropout.p is None
  # The masks differ per micro-batch: one shared key gives other numbers.
  shared = [eqx.filter_grad(lambda *a, **k: loss_fn(*a, **k)[0])(
      model, 2.0, x[j::K], y[j::K], rng=rng, act=jnp.tanh, train=True)
      for j in range(K)]
  assert not np.allclose(grads.linear.weight, sum(
      g.linear.weight for g in shared) / K)


def test_key_keyword_is_folded_per_microbatch():
  """Equinox's own convention, a key= keyword, gets micro-batch j its own
  fold_in(key, j) (no shared dropout mask), in filter_value_and_update."""
  model = eqx.nn.Sequential([eqx.nn.Linear(4, 16, key=jax.random.key(0)),
                             eqx.nn.Lambda(jnp.tanh), eqx.nn.Dropout(0.5),
                             eqx.nn.Linear(16, 3, key=jax.random.key(1))])

  def loss_fn(model, x, y, *, key):
    keys = jax.random.split(key, x.shape[0])
    return jnp.mean((jax.vmap(lambda xi, k: model(xi, key=k))(x, keys) - y)
                    ** 2)

  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jax.random.normal(jax.random.key(2), (8, 3))
  key = jax.random.key(3)
  tx = accum_jax.accumulate(optax.sgd(1.0), K)
  params = eqx.filter(model, eqx.is_inexact_array)
  value, updates, _ = eqx.filter_jit(accum_jax.filter_value_and_update(
      loss_fn, tx))(model, tx.init(params), x, y, key=key)
  ref = [eqx.filter_value_and_grad(loss_fn)(model, x[j::K], y[j::K],
                                            key=jax.random.fold_in(key, j))
         for j in range(K)]
  np.testing.assert_allclose(value, sum(v for v, _ in ref) / K, rtol=1e-6)
  want = jax.tree.map(lambda *g: -sum(g) / K, *[g for _, g in ref])
  for got, exp in zip(jax.tree.leaves(updates), jax.tree.leaves(want),
                      strict=True):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-7)


def test_value_and_grad_on_a_module_points_to_the_filter_helpers():
  model = CNN(jax.random.key(0))
  x, y = digits_batches(1)[0]
  with pytest.raises(TypeError, match='accum_jax.filter_value_and_grad'):
    accum_jax.value_and_grad(lambda m, b: loss(m, *b), K)(model, (x, y))


def test_update_refuses_a_plain_optimizer():
  model = CNN(jax.random.key(0))
  optim = optax.adamw(LEARNING_RATE)
  x, y = digits_batches(1)[0]
  with pytest.raises(TypeError, match='filter_value_and_update needs a '
                     'transform made by accum_jax.accumulate'):
    accum_jax.filter_value_and_update(loss, optim)(
        model, optim.init(eqx.filter(model, eqx.is_array)), x, y)


def test_bad_argnums():
  model = CNN(jax.random.key(0))
  x, y = digits_batches(1)[0]
  with pytest.raises(ValueError, match='batch_argnums=3 must name.*from 1 to 2'):
    accum_jax.filter_value_and_grad(loss, K, batch_argnums=3)(model, x, y)
  with pytest.raises(ValueError, match='no batch to split'):
    accum_jax.filter_value_and_grad(lambda m: 0.0, K)(model)


@pytest.mark.parametrize('blocked', [False, True])
def test_equinox_is_imported_lazily(blocked):
  """import accum_jax does not import equinox; without it the helpers raise
  an ImportError saying what to install."""
  code = (
      'import sys\n'
      + ("sys.modules['equinox'] = None\n" if blocked else '')
      + 'import accum_jax\n'
      "assert 'equinox' not in sys.modules or sys.modules['equinox'] is None\n"
      'try:\n'
      '  accum_jax.filter_value_and_grad\n'
      'except ImportError as e:\n'
      '  print(e)\n'
      'else:\n'
      "  print('imported', 'equinox' in sys.modules)\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  out = subprocess.run([sys.executable, '-c', code], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  if blocked:
    assert 'need Equinox: pip install equinox' in out.stdout
  else:
    assert out.stdout.strip() == 'imported True'
