"""The remat= option of value_and_grad / value_and_update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import heavy_layers

POLICIES = {
    'none': None,
    'full': True,
    'dots': jax.checkpoint_policies.dots_saveable,
    'names': jax.checkpoint_policies.save_only_these_names('layer'),
}


def loss_fn(params, batch, rng=None):
  h = heavy_layers(params, batch['x'])
  if rng is not None:  # dropout: the remat'd backward must reuse the mask
    h = jnp.where(jax.random.bernoulli(rng, 0.9, h.shape), h / 0.9, 0.0)
  return jnp.mean((h - batch['y']) ** 2)


def setup(batch_size=64, width=32, depth=4):
  rng = np.random.default_rng(0)
  params = [jnp.asarray(rng.normal(size=(width, width)) / 6, jnp.float32)
            for _ in range(depth)]
  batch = {'x': jnp.asarray(rng.normal(size=(batch_size, width)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(batch_size, width)), jnp.float32)}
  return params, batch


@functools.lru_cache
def references():
  """What every policy is compared with, computed once for all of them:
  without remat under the dropout key of 3, and the full-batch gradient."""
  params, batch = setup()
  with_rng = jax.jit(accum_jax.value_and_grad(loss_fn, 4))(
      params, batch, rng=jax.random.key(3))
  return with_rng, jax.value_and_grad(loss_fn)(params, batch)


@pytest.mark.parametrize('remat', list(POLICIES))
def test_gradients_do_not_depend_on_remat(remat):
  params, batch = setup()
  key = jax.random.key(3)
  (ref_loss, ref_grads), (full_loss, full_grads) = references()
  loss, grads = jax.jit(accum_jax.value_and_grad(
      loss_fn, 4, remat=POLICIES[remat]))(params, batch, rng=key)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  # And both are the full-batch gradient without micro-batches' dropout: check
  # the no-rng case against jax.value_and_grad on the whole batch.
  loss, grads = jax.jit(accum_jax.value_and_grad(
      loss_fn, 4, remat=POLICIES[remat]))(params, batch)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  for g, r in zip(grads, full_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('remat', ['full', 'names'])
def test_value_and_update_with_remat_matches_without(remat):
  params, batch = setup()
  tx = accum_jax.accumulate(optax.adam(1e-2), 2)
  ref = jax.jit(accum_jax.value_and_update(loss_fn, tx))
  got = jax.jit(accum_jax.value_and_update(loss_fn, tx,
                                           remat=POLICIES[remat]))
  s_ref = s_got = tx.init(params)
  for _ in range(2):
    l_ref, u_ref, s_ref = ref(params, s_ref, batch)
    l_got, u_got, s_got = got(params, s_got, batch)
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-6)
    for a, b in zip(u_got, u_ref, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # adam ~ lr*sign


def test_remat_lowers_compiled_peak_on_activation_heavy_model():
  """Saving only the layer outputs recomputes the rest near its use."""
  params, _ = setup(width=128, depth=8)
  batch = {'x': jax.ShapeDtypeStruct((2048, 128), jnp.float32),
           'y': jax.ShapeDtypeStruct((2048, 128), jnp.float32)}

  def figures(remat):
    f = accum_jax.value_and_grad(loss_fn, 2, remat=remat)
    c = jax.jit(f).lower(params, batch).compile()
    stats = c.memory_analysis()
    return stats.temp_size_in_bytes, c.cost_analysis()['flops']

  temp, flops = figures(None)
  temp_names, flops_names = figures(POLICIES['names'])
  assert temp_names < 0.7 * temp, (temp_names, temp)
  assert flops_names > flops  # the price: recomputation
