"""Which parameters a loss only casts (FSDP gathers those cast).

Checked on losses as users write them: a plain JAX loss, a Flax linen model
and an NNX model computing in bfloat16 with float32 parameters; and on the
uses that must keep a parameter in its own dtype.
"""

import jax
import jax.numpy as jnp
import pytest

from accum_jax import _casts

BF16 = jnp.dtype(jnp.bfloat16)


def test_plain_loss():
  params = {'w': jnp.ones((8, 4)), 'b': jnp.ones(4), 'scale': jnp.ones(4)}

  def loss(p, x):
    h = x.astype(BF16) @ p['w'].astype(BF16) + p['b'].astype(BF16)
    # 'scale' is read in float32 too: not only cast.
    return jnp.sum(h.astype(jnp.float32) * p['scale']) + jnp.sum(
        p['scale'].astype(BF16))

  # Leaves in key order: b, scale, w.
  assert _casts.cast_dtypes(loss, params, jnp.ones((2, 8))) == [
      BF16, None, BF16]


@pytest.mark.parametrize('use', ['twice', 'widened', 'returned', 'nested',
                                 'to int', 'unused'])
def test_other_uses_keep_the_dtype(use):
  w = jnp.ones((4, 4))

  def loss(p, x):
    if use == 'twice':
      return jnp.sum(x @ p.astype(BF16)) + jnp.sum(p.astype(BF16))
    if use == 'widened':
      return jnp.sum(x.astype(jnp.float32) @ p.astype(jnp.float32))
    if use == 'returned':
      return jnp.sum(x), p
    if use == 'nested':  # a jit-ed call is not looked into
      return jnp.sum(jax.jit(lambda q: x @ q.astype(BF16))(p))
    if use == 'to int':
      return jnp.sum(p.astype(jnp.int8))
    return jnp.sum(x)

  assert _casts.cast_dtypes(loss, w, jnp.ones((2, 4), BF16)) == [None]


def test_a_float16_parameter_cast_to_bfloat16_is_not_narrowed():
  w = jnp.ones((4, 4), jnp.float16)
  assert _casts.cast_dtypes(lambda p: jnp.sum(p.astype(BF16)), w) == [None]


def test_flax_linen_model():
  nn = pytest.importorskip('flax.linen')

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32, dtype=BF16)(x))
      x = nn.LayerNorm(dtype=BF16)(x)  # its statistics are float32
      return nn.Dense(4, dtype=BF16)(x)

  model, x = Model(), jnp.ones((2, 8))
  params = model.init(jax.random.key(0), x)['params']

  def loss(p, x):
    return jnp.sum(model.apply({'params': p}, x).astype(jnp.float32))

  # Dense_0 (bias, kernel), Dense_1 (bias, kernel), LayerNorm_0 (bias, scale)
  assert _casts.cast_dtypes(loss, params, x) == [BF16] * 4 + [None, None]


def test_flax_nnx_model():
  nnx = pytest.importorskip('flax.nnx')

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 32, dtype=BF16, rngs=rngs)
      self.l2 = nnx.Linear(32, 4, dtype=BF16, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  graph, state = nnx.split(Model(nnx.Rngs(0)))

  def loss(s, x):
    return jnp.sum(nnx.merge(graph, s)(x).astype(jnp.float32))

  assert _casts.cast_dtypes(loss, state, jnp.ones((2, 8))) == [BF16] * 4
