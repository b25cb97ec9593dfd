"""accum_jax.linen_train_step against full-batch and hand-written references."""

import functools
import os
import pathlib
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import accum_jax
from tests._helpers import (
    assert_trees_close,
    class_batch,
    inner_count,
    microbatch,
    xent,
)

B = 16  # batch rows
D = 6   # features


make_batch = functools.partial(class_batch, rows=B, features=D)


class MLP(nn.Module):
  """Small model; optional BatchNorm and dropout."""
  batch_norm: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(8, use_bias=not self.batch_norm)(x)  # BN cancels a bias
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    x = jnp.tanh(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(3)(x)


class BNState(train_state.TrainState):
  batch_stats: Any


@pytest.mark.parametrize('k, plain_tx', [(1, False), (4, False), (4, True)])
def test_matches_full_batch_training(k, plain_tx):
  model = MLP()
  params = model.init(jax.random.key(1), jnp.ones((1, D)))['params']

  def loss_fn(params, mb):
    logits = model.apply({'params': params}, mb['x'])
    return xent(logits, mb['y']), {'acc': jnp.mean(logits.argmax(-1) == mb['y'])}

  inner = optax.adam(1e-2)
  tx = inner if plain_tx else accum_jax.accumulate(inner, k)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  ref = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=inner)
  step = jax.jit(lambda s, b: accum_jax.linen_train_step(
      s, b, loss_fn, has_aux=True, num_microbatches=k if plain_tx else None))

  @jax.jit
  def ref_step(s, b):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.params, b)
    return s.apply_gradients(grads=grads), (loss, aux)

  for i in range(3):
    batch = make_batch(i)
    state, (loss, aux) = step(state, batch)
    ref, (ref_loss, ref_aux) = ref_step(ref, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux['acc'], ref_aux['acc'], rtol=1e-5)
    assert_trees_close(state.params, ref.params, rtol=1e-5, atol=1e-6)
    # One call is one optimizer step, for the TrainState and the inner adam.
    assert int(state.step) == i + 1
    assert inner_count(state.opt_state) == i + 1
  if not plain_tx:
    assert int(state.opt_state.count) == 0


def test_weight_fn_gives_the_full_batch_token_mean():
  model = MLP()
  params = model.init(jax.random.key(1), jnp.ones((1, D)))['params']
  batch = make_batch(3)
  # Padding mask with uneven real rows per micro-batch (k=4: rows j::4).
  batch['mask'] = jnp.array([1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1],
                            jnp.float32)

  def loss_fn(params, mb):
    per_row = optax.softmax_cross_entropy_with_integer_labels(
        model.apply({'params': params}, mb['x']), mb['y'])
    return jnp.sum(per_row * mb['mask']) / jnp.maximum(mb['mask'].sum(), 1)

  tx = accum_jax.accumulate(optax.sgd(0.5), 4)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  state, loss = jax.jit(lambda s, b: accum_jax.linen_train_step(
      s, b, loss_fn, weight_fn=lambda mb: mb['mask'].sum()))(state, batch)
  ref_loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_trees_close(state.params,
                     jax.tree.map(lambda p, g: p - 0.5 * g, params, grads),
                     rtol=1e-5, atol=1e-6)


def test_batch_stats_threaded_like_a_sequential_loop():
  k = 4
  model = MLP(batch_norm=True)
  variables = model.init(jax.random.key(2), jnp.ones((2, D)), train=False)
  params, stats = variables['params'], variables['batch_stats']
  inner = optax.adam(1e-2)
  state = BNState.create(apply_fn=model.apply, params=params, batch_stats=stats,
                         tx=accum_jax.accumulate(inner, k))

  def loss_fn(params, mb, model_state):
    logits, new_model_state = model.apply(
        {'params': params, **model_state}, mb['x'],
        mutable=list(model_state))
    return (xent(logits, mb['y']), jnp.mean(logits)), new_model_state

  step = jax.jit(lambda s, b: accum_jax.linen_train_step(s, b, loss_fn,
                                                         has_aux=True))

  # Hand-written reference: k sequential forward/backward passes on rows
  # j, j+k, ..., each seeing the statistics left by the previous one.
  def seq_loss(params, mb, stats):
    (loss, aux), new = loss_fn(params, mb, {'batch_stats': stats})
    return loss, (aux, new['batch_stats'])

  @jax.jit
  def ref_step(params, stats, opt_state, batch):
    grad_sum, loss_sum, aux_sum = None, 0.0, 0.0
    for j in range(k):
      (loss, (aux, stats)), grads = jax.value_and_grad(seq_loss, has_aux=True)(
          params, microbatch(batch, j, k), stats)
      loss_sum += loss
      aux_sum += aux
      grad_sum = grads if grad_sum is None else jax.tree.map(
          jnp.add, grad_sum, grads)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    updates, opt_state = inner.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state,
            loss_sum / k, aux_sum / k)

  ref_params, ref_stats, ref_opt = params, stats, inner.init(params)
  for i in range(2):
    batch = make_batch(10 + i)
    state, (loss, aux) = step(state, batch)
    ref_params, ref_stats, ref_opt, ref_loss, ref_aux = ref_step(
        ref_params, ref_stats, ref_opt, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux, ref_aux, rtol=1e-5, atol=1e-7)
    assert_trees_close(state.params, ref_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(state.batch_stats, ref_stats, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 2 and inner_count(state.opt_state) == 2

  # The statistics are not the full-batch ones (documented): one full-batch
  # pass from the same start moves the running mean differently.
  _, (_, full) = seq_loss(params, make_batch(10), stats)
  once = step(BNState.create(apply_fn=model.apply, params=params,
                             batch_stats=stats,
                             tx=accum_jax.accumulate(inner, k)),
              make_batch(10))[0]
  assert not np.allclose(once.batch_stats['BatchNorm_0']['mean'],
                         full['BatchNorm_0']['mean'])


def test_nonfinite_microbatch_leaves_batch_stats_untouched():
  """With nonfinite='skip_microbatch' a NaN micro-batch is dropped from the
  gradient mean and from the BatchNorm statistics threaded through the loop."""
  k = 4
  model = MLP(batch_norm=True)
  variables = model.init(jax.random.key(2), jnp.ones((2, D)), train=False)
  params, stats = variables['params'], variables['batch_stats']
  tx = accum_jax.accumulate(optax.sgd(0.1), k, nonfinite='skip_microbatch')
  state = BNState.create(apply_fn=model.apply, params=params,
                         batch_stats=stats, tx=tx)

  def loss_fn(params, mb, model_state):
    logits, new = model.apply({'params': params, **model_state}, mb['x'],
                              mutable=list(model_state))
    return xent(logits, mb['y']), new

  batch = make_batch(5)
  batch['x'] = batch['x'].at[1::k].set(jnp.nan)  # all of micro-batch 1
  state, loss = jax.jit(lambda s, b: accum_jax.linen_train_step(
      s, b, loss_fn))(state, batch)

  # Reference: the three finite micro-batches in order, micro-batch 1 absent.
  grads, losses = [], []
  for j in (0, 2, 3):
    (loss_j, new), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, microbatch(batch, j, k), {'batch_stats': stats})
    stats = new['batch_stats']
    grads.append(g)
    losses.append(loss_j)
  mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
  np.testing.assert_allclose(loss, sum(losses) / 3, rtol=1e-5)
  assert_trees_close(state.batch_stats, stats, rtol=1e-5, atol=1e-6)
  assert_trees_close(state.params,
                     jax.tree.map(lambda p, g: p - 0.1 * g, params, mean),
                     rtol=1e-5, atol=1e-6)
  assert int(state.opt_state.skipped_microbatches) == 1


def test_dropout_masks_differ_between_identical_microbatches():
  k = 2
  model = MLP(dropout=0.5)
  params = model.init(jax.random.key(3), jnp.ones((1, D)))['params']
  # Every row is the same, so micro-batches 0 and 1 have identical inputs.
  batch = {'x': jnp.ones((4, D)), 'y': jnp.zeros((4,), jnp.int32)}
  rng = jax.random.key(7)

  def loss_fn(params, mb, rng):
    logits = model.apply({'params': params}, mb['x'], rngs={'dropout': rng})
    return xent(logits, mb['y']), logits

  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=accum_jax.accumulate(optax.sgd(0.1), k))
  _, (_, logits) = jax.jit(lambda s, b, r: accum_jax.linen_train_step(
      s, b, loss_fn, rng=r, has_aux=True, aux='stack'))(state, batch, rng)
  assert logits.shape == (k, 2, 3)
  assert not np.allclose(logits[0], logits[1])
  # Micro-batch j used fold_in(rng, j).
  for j in range(k):
    expected = model.apply({'params': params}, batch['x'][j::k],
                           rngs={'dropout': jax.random.fold_in(rng, j)})
    np.testing.assert_allclose(logits[j], expected, rtol=1e-6)


def test_same_memory_as_value_and_update():
  """The helper adds nothing to the core's compiled step memory."""
  k = 4
  model = nn.Sequential([nn.Dense(256), nn.tanh, nn.Dense(256), nn.tanh,
                         nn.Dense(256)])
  x = jnp.ones((64, 256))
  batch = {'x': x, 'y': x}
  params = model.init(jax.random.key(0), x[:1])['params']
  tx = accum_jax.accumulate(optax.adam(1e-3), k)

  def loss_fn(params, mb):
    return jnp.mean((model.apply({'params': params}, mb['x']) - mb['y']) ** 2)

  def peak(fn, *args):
    m = jax.jit(fn, donate_argnums=0).lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes
            + m.temp_size_in_bytes - m.alias_size_in_bytes)

  def core_step(carry, batch):
    params, opt_state = carry
    loss, updates, opt_state = accum_jax.value_and_update(loss_fn, tx)(
        params, opt_state, batch)
    return (optax.apply_updates(params, updates), opt_state), loss

  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  helper = peak(lambda s, b: accum_jax.linen_train_step(s, b, loss_fn),
                state, batch)
  core = peak(core_step, (params, tx.init(params)), batch)
  assert helper <= core + 1024, (helper, core)


class TestErrors:

  def setup_method(self):
    self.model = MLP()
    self.params = self.model.init(jax.random.key(0), jnp.ones((1, D)))['params']

  def state(self, tx, cls=train_state.TrainState, **kw):
    return cls.create(apply_fn=self.model.apply, params=self.params, tx=tx,
                      **kw)

  def loss_fn(self, params, mb):
    return xent(self.model.apply({'params': params}, mb['x']), mb['y'])

  def test_plain_tx_needs_accumulate_or_num_microbatches(self):
    with pytest.raises(TypeError, match=r'state.tx is a GradientTransformation'
                       r'.*not an accum_jax.accumulate transform'):
      accum_jax.linen_train_step(self.state(optax.adam(1e-3)), make_batch(),
                                 self.loss_fn)

  def test_opt_state_not_made_by_the_accumulate_tx(self):
    state = self.state(optax.adam(1e-3)).replace(
        tx=accum_jax.accumulate(optax.adam(1e-3), 4))
    with pytest.raises(TypeError, match=r'state.opt_state is a tuple, not the '
                       r'AccumulateState of state.tx'):
      accum_jax.linen_train_step(state, make_batch(), self.loss_fn)

  def test_num_microbatches_disagrees_with_accumulate(self):
    with pytest.raises(ValueError, match=r'num_microbatches=4\) but '
                       r'num_microbatches=2'):
      accum_jax.linen_train_step(
          self.state(accum_jax.accumulate(optax.sgd(1.0), 4)), make_batch(),
          self.loss_fn, num_microbatches=2)

  def test_batch_not_divisible_by_k(self):
    with pytest.raises(ValueError, match='batch size 15 is not divisible by '
                       'num_microbatches=4'):
      accum_jax.linen_train_step(
          self.state(accum_jax.accumulate(optax.sgd(1.0), 4)),
          make_batch(rows=15), self.loss_fn)

  def test_loss_returns_pair_without_has_aux(self):
    with pytest.raises(TypeError, match='pass has_aux=True'):
      accum_jax.linen_train_step(
          self.state(accum_jax.accumulate(optax.sgd(1.0), 4)), make_batch(),
          lambda p, mb: (self.loss_fn(p, mb), {}))

  def test_has_aux_but_loss_returns_scalar(self):
    with pytest.raises(TypeError, match=r'has_aux=True, loss_fn must return a '
                       r'pair \(loss, aux\); got'):
      accum_jax.linen_train_step(
          self.state(accum_jax.accumulate(optax.sgd(1.0), 4)), make_batch(),
          self.loss_fn, has_aux=True)

  def test_batch_stats_loss_must_return_new_state(self):
    model = MLP(batch_norm=True)
    v = model.init(jax.random.key(0), jnp.ones((2, D)), train=False)
    state = BNState.create(apply_fn=model.apply, params=v['params'],
                           batch_stats=v['batch_stats'],
                           tx=accum_jax.accumulate(optax.sgd(1.0), 4))

    def loss_only(params, mb, model_state):
      logits, _ = model.apply({'params': params, **model_state}, mb['x'],
                              mutable=['batch_stats'])
      return xent(logits, mb['y'])

    with pytest.raises(TypeError, match=r'must return \(out, new_state\)'):
      accum_jax.linen_train_step(state, make_batch(), loss_only)

    def wrong_state(params, mb, model_state):
      logits, new = model.apply({'params': params, **model_state}, mb['x'],
                                mutable=['batch_stats'])
      return xent(logits, mb['y']), new['batch_stats']  # not {'batch_stats':}

    with pytest.raises(ValueError, match='new state with the structure of the '
                       'state it was given'):
      accum_jax.linen_train_step(state, make_batch(), wrong_state)

  def test_mutable_names_a_missing_field(self):
    with pytest.raises(ValueError, match=r"names \['cache'\], which "
                       'TrainState has no field for'):
      accum_jax.linen_train_step(
          self.state(accum_jax.accumulate(optax.sgd(1.0), 4)), make_batch(),
          self.loss_fn, mutable='cache')


def test_flax_is_imported_only_on_first_use():
  """accum_jax depends on jax and optax only; the Flax names load lazily."""
  code = '\n'.join([
      'import sys',
      'import accum_jax',
      "assert 'flax' not in sys.modules, 'import accum_jax imported flax'",
      "assert {'linen_train_step', 'nnx_train_step'} <= set(accum_jax.__all__)",
      "assert 'linen_train_step' in dir(accum_jax)",
      "sys.modules['flax'] = None  # as if Flax were not installed",
      'try:',
      '  accum_jax.linen_train_step',
      'except ImportError as e:',
      "  assert 'pip install flax' in str(e), e",
      'else:',
      "  raise AssertionError('no ImportError without flax')",
  ])
  root = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
  subprocess.run([sys.executable, '-c', code], check=True, env=env,
                 timeout=120)
