"""What several test files share: tree comparisons, the strided micro-batch
reference, small models with their data, and the inner optimizers.

Imported as ``from tests._helpers import ...`` (``tests`` is a package and
the repository root is on ``sys.path`` through pytest's ``pythonpath``).
Everything here is a plain function, so the numbers a test asserts stay
visible at its call site: tolerances are passed there, never defaulted here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

import accum_jax

# Tree comparisons.


def assert_trees_close(a, b, *, rtol, atol, check_dtype=False):
  """Same tree structure and leaf shapes, every leaf allclose, compared in
  float64.

  ``check_dtype`` also asks every pair of leaves for the same dtype.
  """
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.shape(x) == np.shape(y), (np.shape(x), np.shape(y))
    if check_dtype:
      assert x.dtype == y.dtype, (x.dtype, y.dtype)
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
  """Bit-identical trees: the same structure, dtypes and values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert jnp.result_type(x) == jnp.result_type(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# The strided split, written independently of accum_jax.split_batch.


def microbatch(batch, j, k):
  """Rows j, j+k, j+2k, ...: micro-batch j of k."""
  return jax.tree.map(lambda x: x[j::k], batch)


def micro_grads(loss_fn, params, batch, k):
  """The gradient of every micro-batch of the strided split, one by one."""
  return [jax.grad(loss_fn)(params, microbatch(batch, j, k))
          for j in range(k)]


# A linear regression on 3 features: params {'w': (3,), 'b': ()}.


def linear_loss(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  return jnp.mean((pred - batch['y']) ** 2)


def linear_params():
  return {'w': jnp.array([0.5, -1.0, 0.25]), 'b': jnp.array(0.1)}


def linear_batch(n=16, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {'x': jax.random.normal(kx, (n, 3)), 'y': jax.random.normal(ky, (n,))}


# A 3-class classification batch for the Flax models.


def class_batch(seed=0, rows=16, *, features):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {'x': jax.random.normal(kx, (rows, features)),
          'y': jax.random.randint(ky, (rows,), 0, 3)}


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def inner_count(opt_state):
  """The inner step count (inside an accumulate state or a plain one)."""
  if isinstance(opt_state, accum_jax.AccumulateState):
    opt_state = opt_state.inner_state
  return int(optax.tree_utils.tree_get(opt_state, 'count'))


# A stack of square layers with a wide elementwise tail per layer, so that
# activations dominate memory; the outputs are named 'layer' for remat
# policies.


def heavy_layers(params, h):
  for w in params:
    z = h @ w
    h = checkpoint_name(jax.nn.gelu(z) * jnp.sin(z) + jnp.cos(z) * z, 'layer')
  return h


# Inner optimizers, by name.


def optimizer_table(clip_norm, lr_schedule):
  """Factories of the inner optimizers the equality tests run through.

  Args:
    clip_norm: the global-norm threshold of 'clip_adam'.
    lr_schedule: the learning-rate schedule of 'schedule' (adam with its
      hyperparameters injected, so the schedule lives in the state).
  """
  return {
      'sgd': lambda: optax.sgd(0.1),
      'momentum': lambda: optax.sgd(0.1, momentum=0.9),
      'adam': lambda: optax.adam(0.01),
      'adamw': lambda: optax.adamw(0.01, weight_decay=0.1),
      'clip_adam': lambda: optax.chain(optax.clip_by_global_norm(clip_norm),
                                       optax.adam(0.01)),
      'schedule': lambda: optax.inject_hyperparams(optax.adam)(
          learning_rate=lr_schedule),
  }
