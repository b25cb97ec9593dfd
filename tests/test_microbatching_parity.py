"""Parity with optax.microbatching: batched arguments and axes, per-example
gradient transforms (DP-SGD clipping), and per-row aux in row order.

Each result is checked against optax.microbatching on the same inputs where
it has the feature, and against the full-batch computation otherwise.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import assert_trees_close

try:
  import optax.microbatching as mb
except ImportError:  # optax < 0.2.7
  mb = None

B, T, D, C = 16, 3, 4, 5
CLIP = 1.2


def _optax_mb():
  """optax.microbatching, the reference; skips the rest of a test without it.

  Call it after the checks against the full-batch computation, which run on
  every supported optax.
  """
  if mb is None:
    pytest.skip('optax.microbatching is new in optax 0.2.7')
  return mb


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'w': jax.random.normal(k1, (D, C)) * 0.5,
          'b': jax.random.normal(k2, (C,)) * 0.1}


def _data(seed=1):
  """Sequence-first inputs ``(T, B, D)`` and labels ``(B,)``."""
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (T, B, D)) * 2.0,
          jax.random.randint(ky, (B,), 0, C))


def seq_loss(params, x, y):
  """Cross-entropy of a sequence-first batch: x ``(T, b, D)``, y ``(b,)``;
  aux: the logits ``(b, C)`` and the count of correct rows."""
  logits = jnp.tanh(x).mean(0) @ params['w'] + params['b']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, {'logits': logits,
                'correct': jnp.sum(jnp.argmax(logits, -1) == y)}


def loss_only(params, x, y):
  return seq_loss(params, x, y)[0]


def clip(grads):
  """One example's gradient clipped to global norm ``CLIP``."""
  return optax.clip_by_global_norm(CLIP).update(grads, optax.EmptyState())[0]


def _close(a, b, rtol=1e-5, atol=1e-6):
  assert_trees_close(a, b, rtol=rtol, atol=atol)


def _per_example_grads(params, x, y):
  """The full batch's per-example gradients, leading axis ``B``."""
  return jax.vmap(jax.grad(loss_only), in_axes=(None, 1, 0))(
      params, x[:, :, None], y[:, None])


# Which arguments are batched, and along which axis.


@pytest.mark.parametrize('k', [1, 2, 4, 8])
def test_two_batched_arguments_sequence_first_match_optax_microbatch(k):
  params = _params()
  x, y = _data()
  f = jax.jit(accum_jax.value_and_grad(
      seq_loss, k, has_aux=True, batch_argnums=(1, 2), in_axes=(1, 0)))
  (loss, aux), grads = f(params, x, y)
  # the full-batch computation
  (full_loss, full_aux), full_grads = jax.value_and_grad(
      seq_loss, has_aux=True)(params, x, y)
  _close(loss, full_loss)
  _close(grads, full_grads)
  assert int(aux['correct']) == int(full_aux['correct'])
  # and optax's
  mb = _optax_mb()
  ref = mb.microbatch(
      jax.value_and_grad(seq_loss, has_aux=True), argnums=(1, 2),
      microbatch_size=B // k, in_axes=(1, 0),
      accumulator=((mb.AccumulationType.MEAN,
                    {'logits': mb.AccumulationType.MEAN,
                     'correct': mb.AccumulationType.SUM}),
                   mb.AccumulationType.MEAN))
  (ref_loss, ref_aux), ref_grads = ref(params, x, y)
  _close(loss, ref_loss)
  _close(grads, ref_grads)
  _close(aux, ref_aux)


def test_batch_as_keyword_and_positional_mix():
  params = _params()
  x, y = _data()

  def loss_kw(params, scale, *, x, y):
    return scale * loss_only(params, x, y)

  f = accum_jax.value_and_grad(loss_kw, 4, batch_argnames=('x', 'y'),
                               in_axes=(1, 0))
  loss, grads = f(params, 2.0, x=x, y=y)
  ref_loss, ref_grads = jax.value_and_grad(loss_kw)(params, 2.0, x=x, y=y)
  _close(loss, ref_loss)
  _close(grads, ref_grads)

  # optax's own: argnums=1 and argnames='y' aligned with in_axes
  g = accum_jax.value_and_grad(loss_only, 4, batch_argnums=1,
                               batch_argnames='y', in_axes=(1, 0))
  loss, grads = g(params, x, y=y)
  ref_loss, ref_grads = jax.value_and_grad(loss_only)(params, x, y=y)
  _close(loss, ref_loss)
  _close(grads, ref_grads)
  mb = _optax_mb()
  ref = mb.microbatch(jax.value_and_grad(loss_only), argnums=1,
                      argnames='y', in_axes=(1, 0), microbatch_size=B // 4,
                      accumulator=mb.AccumulationType.MEAN)
  ref_loss, ref_grads = ref(params, x, y=y)
  _close(loss, ref_loss)
  _close(grads, ref_grads)


def test_single_batch_argument_on_axis_one():
  params = _params()
  x, y = _data()

  def loss_dict(params, batch):
    return loss_only(params, batch['x'], batch['y'][0])

  batch = {'x': x, 'y': y[None]}  # every leaf: batch axis 1
  loss, grads = accum_jax.value_and_grad(loss_dict, 4, in_axes=1)(params,
                                                                  batch)
  ref_loss, ref_grads = jax.value_and_grad(loss_dict)(params, batch)
  _close(loss, ref_loss)
  _close(grads, ref_grads)


def test_default_split_unchanged_and_batch_keyword_still_taken():
  params = _params()
  x, y = _data()
  batch = {'x': x.swapaxes(0, 1), 'y': y}

  def loss_fn(params, batch):
    return loss_only(params, batch['x'].swapaxes(0, 1), batch['y'])

  ref = jax.value_and_grad(loss_fn)(params, batch)
  f = accum_jax.value_and_grad(loss_fn, 4)
  _close(f(params, batch), ref)
  _close(f(params, batch=batch), ref)


def test_weight_fn_gets_every_batched_argument():
  params = _params()
  x, y = _data()
  mask = (jnp.arange(B) % 3 != 0).astype(jnp.float32)

  def masked(params, x, y, mask):
    logits = jnp.tanh(x).mean(0) @ params['w'] + params['b']
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  seen = []

  def weight_fn(x, y, mask):
    seen.append((x.shape, y.shape, mask.shape))
    return jnp.sum(mask)

  f = accum_jax.value_and_grad(masked, 4, batch_argnums=(1, 2, 3),
                               in_axes=(1, 0, 0), weight_fn=weight_fn)
  loss, grads = f(params, x, y, mask)
  ref_loss, ref_grads = jax.value_and_grad(masked)(params, x, y, mask)
  _close(loss, ref_loss)
  _close(grads, ref_grads)
  assert seen[0] == ((T, B // 4, D), (B // 4,), (B // 4,))


def test_value_and_update_with_batched_arguments_matches_multisteps():
  params = _params()
  x, y = _data()
  k = 4
  tx = accum_jax.accumulate(optax.adam(1e-2), k)
  step = jax.jit(accum_jax.value_and_update(
      loss_only, tx, batch_argnums=(1, 2), in_axes=(1, 0)))
  loss, updates, _ = step(params, tx.init(params), x, y)
  ms = optax.MultiSteps(optax.adam(1e-2), k)
  state = ms.init(params)
  xs, ys = accum_jax.split_batch(x, k, axis=1), accum_jax.split_batch(y, k)
  for j in range(k):
    ref_updates, state = ms.update(jax.grad(loss_only)(params, xs[j], ys[j]),
                                   state, params)
  _close(updates, ref_updates)
  _close(loss, loss_only(params, x, y))


def test_split_of_a_non_leading_axis_is_copy_free():
  """Outside the loop, the batch is only reshaped (no transpose, no gather)."""
  params = _params()
  x, y = _data()
  f = accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2),
                               in_axes=(1, 0))
  jaxpr = jax.make_jaxpr(f)(params, x, y).jaxpr
  # Up to the scan: only the free reshapes of x and y.
  prims = [e.primitive.name for e in jaxpr.eqns]
  before = prims[:prims.index('scan')]
  assert set(before) <= {'reshape', 'broadcast_in_dim', 'iota'}, before
  scan = jaxpr.eqns[prims.index('scan')]
  shapes = [tuple(v.aval.shape) for v in scan.invars]
  assert (T, B // 4, 4, D) in shapes and (B // 4, 4) in shapes, shapes
  # micro-batch j: a slice of size 1 along the k axis of the reshaped x
  assert f'dynamic_slice[slice_sizes=({T}, {B // 4}, 1, {D})]' in str(
      scan.params['jaxpr'])
  assert 'transpose' not in prims


# The inverse of split_batch.


@pytest.mark.parametrize('axis', [0, 1, -1])
def test_concat_microbatches_inverts_split_batch(axis):
  batch = {'a': jnp.arange(2 * 12 * 3).reshape(2, 12, 3).swapaxes(0, 1)
           if axis == 0 else jnp.arange(2 * 12 * 3).reshape(2, 12, 3),
           }
  if axis == -1:
    batch = {'a': jnp.arange(2 * 3 * 12).reshape(2, 3, 12)}
  split = accum_jax.split_batch(batch, 4, axis=axis)
  size = batch['a'].shape[axis]
  assert split['a'].shape[0] == 4
  # micro-batch j holds rows j, j + 4, ...
  np.testing.assert_array_equal(
      split['a'][1], jnp.take(batch['a'], jnp.arange(1, size, 4), axis=axis))
  back = accum_jax.concat_microbatches(split, axis=axis)
  np.testing.assert_array_equal(back['a'], batch['a'])


# Per-row aux in row order.


@pytest.mark.parametrize('k', [1, 4, 8])
def test_concat_aux_returns_rows_in_order(k):
  params = _params()
  x, y = _data()
  f = jax.jit(accum_jax.value_and_grad(
      lambda p, x, y: (lambda v, a: (v, a['logits']))(*seq_loss(p, x, y)),
      k, has_aux=True, batch_argnums=(1, 2), in_axes=(1, 0),
      aux='concat'))
  (loss, logits), grads = f(params, x, y)
  (ref_loss, ref_aux), ref_grads = jax.value_and_grad(
      seq_loss, has_aux=True)(params, x, y)
  assert logits.shape == (B, C)
  _close(logits, ref_aux['logits'])
  _close(loss, ref_loss)
  _close(grads, ref_grads)
  # optax's CONCAT accumulator gives the same rows
  mb = _optax_mb()
  ref = mb.microbatch(lambda p, x, y: seq_loss(p, x, y)[1]['logits'],
                      argnums=(1, 2), in_axes=(1, 0), microbatch_size=B // k,
                      accumulator=mb.AccumulationType.CONCAT)
  _close(logits, ref(params, x, y))


def test_concat_aux_along_the_batch_axis_of_sequence_first_data():
  params = _params()
  x, _ = _data()

  def loss_fn(params, x):  # per-position outputs (T, b, C)
    out = jnp.tanh(x) @ params['w']
    return jnp.mean(out ** 2), out

  (loss, out), grads = accum_jax.value_and_grad(
      loss_fn, 4, has_aux=True, in_axes=1, aux='concat')(params, x)
  (ref_loss, ref_out), ref_grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params, x)
  assert out.shape == (T, B, C)
  _close(out, ref_out)
  _close(grads, ref_grads)


def test_stack_aux_then_concat_microbatches_is_concat_aux():
  params = _params()
  x, y = _data()

  def loss_fn(params, batch):
    loss, aux = seq_loss(params, batch['x'].swapaxes(0, 1), batch['y'])
    return loss, aux['logits']

  batch = {'x': x.swapaxes(0, 1), 'y': y}
  (_, stacked), _ = accum_jax.value_and_grad(
      loss_fn, 4, has_aux=True, aux='stack')(params, batch)
  (_, rows), _ = accum_jax.value_and_grad(
      loss_fn, 4, has_aux=True, aux='concat')(params, batch)
  assert stacked.shape == (4, B // 4, C)
  _close(accum_jax.concat_microbatches(stacked), rows)
  _close(rows, loss_fn(params, batch)[1])


def test_concat_aux_padding_rows_are_zero_and_update_path():
  params = _params()
  x, y = _data()
  tx = accum_jax.accumulate(optax.sgd(0.1), 4)

  def loss_fn(params, x, y):
    loss, aux = seq_loss(params, x, y)
    return loss, aux['logits']

  step = jax.jit(accum_jax.value_and_update(
      loss_fn, tx, has_aux=True, batch_argnums=(1, 2), in_axes=(1, 0),
      aux='concat'))
  (_, logits), updates, _ = step(params, tx.init(params), x, y,
                                 num_real_microbatches=3)
  full = loss_fn(params, x, y)[1]
  real = np.arange(B) % 4 < 3  # rows of micro-batches 0, 1, 2
  _close(logits[real], full[real])
  assert np.all(np.asarray(logits[~real]) == 0)
  keep = jnp.asarray(real)
  ref = jax.grad(lambda p: loss_only(p, x[:, keep], y[keep]))(params)
  _close(updates, jax.tree.map(lambda g: -0.1 * g, ref))


def test_concat_aux_makes_no_copy_beyond_the_output():
  """The rows are written in place into the output: no more temporaries
  than with the reduced aux (stack_aux + concat_microbatches transposes)."""
  b, d, v = 256, 64, 8192
  params = {'w': jax.ShapeDtypeStruct((d, v), jnp.float32)}
  x = jax.ShapeDtypeStruct((b, d), jnp.float32)

  def loss_fn(p, x):
    logits = x @ p['w']
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  def temp(**kw):
    f = accum_jax.value_and_grad(loss_fn, 8, has_aux=True, **kw)
    return accum_jax.compiled_memory(f, params, x).temp_bytes

  logits_bytes = b * v * 4
  assert temp(aux='concat') < temp() + logits_bytes / 4


# Per-example transforms (DP-SGD clipping).


@pytest.mark.parametrize('k', [1, 2, 4, 16])
def test_per_example_clipping_matches_dp_aggregate_without_noise(k):
  params = _params()
  x, y = _data()
  f = jax.jit(accum_jax.value_and_grad(
      loss_only, k, batch_argnums=(1, 2), in_axes=(1, 0),
      per_example_fn=clip))
  loss, grads = f(params, x, y)
  per_example = _per_example_grads(params, x, y)
  norms = jax.vmap(optax.tree.norm)(per_example)
  assert float(norms.min()) < CLIP < float(norms.max())  # some are clipped
  dp = optax.contrib.differentially_private_aggregate(CLIP, 0.0,
                                                      jax.random.key(0))
  ref_grads, _ = dp.update(per_example, dp.init(params))
  _close(grads, ref_grads)
  _close(loss, loss_only(params, x, y))


@pytest.mark.parametrize('k', [2, 4])
def test_per_example_fn_matches_optax_micro_grad(k):
  params = _params()
  x, y = _data()
  f = accum_jax.value_and_grad(
      seq_loss, k, has_aux=True, batch_argnums=(1, 2), in_axes=(1, 0),
      per_example_fn=clip)
  (loss, aux), grads = f(params, x, y)
  # optax's micro_grad splits along axis 0: give it batch-first x.
  mb = _optax_mb()
  ref_grads, ref_aux = mb.micro_grad(
      lambda p, xb, yb: seq_loss(p, xb.swapaxes(0, 1), yb), has_aux=True,
      batch_argnums=(1, 2), microbatch_size=B // k,
      accumulator=mb.AccumulationType.MEAN, transform_fn=clip)(
          params, x.swapaxes(0, 1), y)
  _close(grads, ref_grads)
  _close(loss, jnp.mean(ref_aux.values))
  # aux reduced over the examples like the loss
  _close(aux['logits'], ref_aux.aux['logits'].mean(0))  # (1, C)
  assert int(aux['correct']) == int(ref_aux.aux['correct'].sum())


def test_per_example_concat_aux_gives_each_examples_aux():
  params = _params()
  x, y = _data()

  def loss_fn(params, x, y):
    loss, aux = seq_loss(params, x, y)
    return loss, aux['logits']

  (loss, logits), grads = accum_jax.value_and_grad(
      loss_fn, 4, has_aux=True, batch_argnums=(1, 2), in_axes=(1, 0),
      per_example_fn=clip, aux='concat')(params, x, y)
  assert logits.shape == (B, C)
  _close(logits, loss_fn(params, x, y)[1])
  mb = _optax_mb()
  _, ref_aux = mb.micro_grad(
      lambda p, xb, yb: loss_fn(p, xb.swapaxes(0, 1), yb), has_aux=True,
      batch_argnums=(1, 2), microbatch_size=4, transform_fn=clip)(
          params, x.swapaxes(0, 1), y)
  _close(logits, ref_aux.aux[:, 0])  # optax keeps each example's batch of 1


def test_per_example_in_value_and_update_matches_dp_sgd_chain():
  params = _params()
  x, y = _data()
  tx = accum_jax.accumulate(optax.adam(1e-2), 4)
  step = jax.jit(accum_jax.value_and_update(
      loss_only, tx, batch_argnums=(1, 2), in_axes=(1, 0),
      per_example_fn=clip))
  opt_state = tx.init(params)
  ref_tx = optax.chain(
      optax.contrib.differentially_private_aggregate(CLIP, 0.0,
                                                     jax.random.key(0)),
      optax.adam(1e-2))
  ref_state = ref_tx.init(params)
  ref_params = params
  for _ in range(3):
    _, updates, opt_state = step(params, opt_state, x, y)
    params = optax.apply_updates(params, updates)
    ref_updates, ref_state = ref_tx.update(
        _per_example_grads(ref_params, x, y), ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
  _close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_per_example_identity_is_the_plain_gradient():
  params = _params()
  x, y = _data()
  f = accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2),
                               in_axes=(1, 0), per_example_fn=lambda g: g)
  _close(f(params, x, y), jax.value_and_grad(loss_only)(params, x, y))


def test_per_example_weights_apply_after_the_transform():
  """A micro-batch's weight scales the mean of its clipped gradients."""
  params = _params()
  x, y = _data()
  k = 4
  f = accum_jax.value_and_grad(
      loss_only, k, batch_argnums=(1, 2), in_axes=(1, 0), per_example_fn=clip,
      weight_fn=lambda x, y: 1.0 + jnp.sum(y).astype(jnp.float32))
  _, grads = f(params, x, y)
  clipped = jax.vmap(clip)(_per_example_grads(params, x, y))
  weights = [1.0 + float(jnp.sum(y[j::k])) for j in range(k)]
  want = jax.tree.map(
      lambda g: sum(w * g[j::k].mean(0) for j, w in enumerate(weights))
      / sum(weights), clipped)
  _close(grads, want)


def test_per_example_memory_is_one_microbatch():
  """Per-example gradients of a wide layer: the full-batch version holds all
  of them, the accumulated one a micro-batch's."""
  width, n = 512, 64
  params = {'w': jnp.zeros((width, width)), 'v': jnp.zeros((width,))}

  def loss_fn(params, x):
    return jnp.mean(jnp.tanh(x @ params['w']) @ params['v'])

  x = jax.ShapeDtypeStruct((n, width), jnp.float32)

  def full(params, x):
    per_example = jax.vmap(jax.grad(loss_fn), (None, 0))(params, x[:, None])
    dp = optax.contrib.differentially_private_aggregate(CLIP, 0.0,
                                                        jax.random.key(0))
    return dp.update(per_example, dp.init(params))[0]

  full_mem = accum_jax.compiled_memory(full, params, x)
  acc_mem = accum_jax.compiled_memory(
      accum_jax.value_and_grad(loss_fn, 8, per_example_fn=clip), params, x)
  per_example_bytes = n * width * width * 4
  assert full_mem.temp_bytes >= per_example_bytes
  assert acc_mem.temp_bytes < per_example_bytes / 8 * 1.5


# Errors.


def test_errors():
  params = _params()
  x, y = _data()
  with pytest.raises(ValueError, match='in_axes has 1 entries'):
    accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2),
                             in_axes=(1,))
  with pytest.raises(ValueError, match='position 0 is the differentiated'):
    accum_jax.value_and_grad(loss_only, 4, batch_argnums=0)
  with pytest.raises(ValueError, match='needs has_aux=True'):
    accum_jax.value_and_grad(loss_only, 4, aux='concat')
  with pytest.raises(ValueError, match='exclude each other'), pytest.warns(
      DeprecationWarning, match='_aux= is deprecated'):
    accum_jax.value_and_grad(seq_loss, 4, has_aux=True, stack_aux=True,
                             concat_aux=True)
  with pytest.raises(ValueError, match=r"aux leaf \['correct'\] has shape"):
    accum_jax.value_and_grad(seq_loss, 4, has_aux=True, aux='concat',
                             batch_argnums=(1, 2), in_axes=(1, 0))(
                                 params, x, y)
  with pytest.raises(ValueError, match='per_example_fn must return a gradient'):
    accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2),
                             in_axes=(1, 0),
                             per_example_fn=lambda g: g['w'])(params, x, y)
  with pytest.raises(ValueError, match='share the batch size along'):
    accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2))(params, x, y)
  with pytest.raises(TypeError, match=r'batched arguments \[2\]'):
    accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2),
                             in_axes=(1, 0))(params, x)
  with pytest.raises(ValueError, match='leading one is split on one'):
    accum_jax.value_and_grad(loss_only, 4, batch_argnums=(1, 2),
                             in_axes=(1, 0), axis_name='data')(params, x, y)


# On a mesh (8 CPU devices, in a subprocess).

MESH_SCRIPT = textwrap.dedent('''
    import jax, numpy as np, optax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import accum_jax
    from accum_jax import _compat

    mesh = _compat.make_mesh((8,), ('data',))  # explicit axes
    kw, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = {'w': jax.random.normal(kw, (8, 5)) * 0.5}
    x = jax.random.normal(kx, (32, 8)) * 2.0
    y = jax.random.randint(ky, (32,), 0, 5)

    def loss_fn(p, x, y):
      logits = jnp.tanh(x) @ p['w']
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, logits

    def clip(g):
      return optax.clip_by_global_norm(0.5).update(g, optax.EmptyState())[0]

    per_example = jax.vmap(jax.grad(lambda p, x, y: loss_fn(p, x, y)[0]),
                           (None, 0, 0))(params, x[:, None], y[:, None])
    want = jax.tree.map(lambda g: g.mean(0), jax.vmap(clip)(per_example))
    want_logits = loss_fn(params, x, y)[1]
    with _compat.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, P('data')))
      ys = jax.device_put(y, NamedSharding(mesh, P('data')))
      f = jax.jit(accum_jax.value_and_grad(
          loss_fn, 2, has_aux=True, batch_argnums=(1, 2),
          per_example_fn=clip, aux='concat'))
      (loss, logits), grads = f(params, xs, ys)
      np.testing.assert_allclose(grads['w'], want['w'], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
      assert logits.sharding.spec[0] == 'data', logits.sharding
      # FSDP parameters: gathered once per step, clipped per example
      fsdp = jax.device_put(params, NamedSharding(mesh, P('data')))
      h = accum_jax.value_and_grad(loss_fn, 2, has_aux=True,
                                   batch_argnums=(1, 2), per_example_fn=clip,
                                   fsdp_reduce='per_step')
      (_, _), grads = jax.jit(h)(fsdp, xs, ys)
      np.testing.assert_allclose(grads['w'], want['w'], rtol=1e-5, atol=1e-6)
      h = accum_jax.value_and_grad(loss_fn, 2, has_aux=True,
                                   batch_argnums=(1, 2), per_example_fn=clip)
      try:
        jax.jit(h)(fsdp, xs, ys)
      except ValueError as e:
        assert "needs fsdp_reduce='per_step'" in str(e), e
      else:
        raise AssertionError('no error for per_microbatch FSDP')
      xt = jax.device_put(x.T, NamedSharding(mesh, P(None, 'data')))
      g = accum_jax.value_and_grad(lambda p, x, y: loss_fn(p, x.T, y)[0], 2,
                                   batch_argnums=(1, 2), in_axes=(1, 0))
      try:
        jax.jit(g)(params, xt, ys)
      except ValueError as e:
        assert 'leading one is split on one device only' in str(e), e
      else:
        raise AssertionError('no error for a sharded non-leading axis')
    print('ok')
''')


def test_on_a_mesh_per_example_and_concat_aux_and_axis_error():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(
      [root] + [p for p in [env.get('PYTHONPATH')] if p])
  proc = subprocess.run([sys.executable, '-c', MESH_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.strip().endswith('ok')


def test_docs_examples_run():
  """The code blocks of docs/microbatching.md, run in order."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'docs', 'microbatching.md')) as f:
    text = f.read()
  blocks = [b.split('```', 1)[0] for b in text.split('```python\n')[1:]]
  assert len(blocks) == 4
  scope = {}
  for block in blocks:
    exec(compile(block, 'docs/microbatching.md', 'exec'), scope)  # noqa: S102
