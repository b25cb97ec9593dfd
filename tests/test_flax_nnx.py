"""NNX: accumulate in nnx.Optimizer (cross-step) and accum_jax.nnx_train_step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# nnx_train_step uses nnx.as_pure and nnx.split(..., graph=): flax >= 0.12.7.
pytest.importorskip('flax', minversion='0.12.7')

from flax import nnx  # noqa: E402

import accum_jax  # noqa: E402
from tests._helpers import (  # noqa: E402
    assert_trees_close,
    class_batch,
    inner_count,
    microbatch,
    xent,
)

B = 16
D = 6


make_batch = functools.partial(class_batch, rows=B, features=D)


class MLP(nnx.Module):
  """Small model; optional BatchNorm and dropout."""

  def __init__(self, rngs, batch_norm=False, dropout=0.0):
    self.dense1 = nnx.Linear(D, 8, use_bias=not batch_norm, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs) if batch_norm else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.dense2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.dense1(x)
    if self.bn is not None:
      x = self.bn(x)
    x = jnp.tanh(x)
    if self.dropout is not None:
      x = self.dropout(x)
    return self.dense2(x)


def loss_fn(model, mb):
  return xent(model(mb['x']), mb['y'])


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
  assert_trees_close(nnx.as_pure(a), nnx.as_pure(b), rtol=rtol, atol=atol)


@nnx.jit
def full_batch_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def test_optimizer_with_accumulate_cross_step():
  """nnx.Optimizer drives accumulate like any optax transform."""
  k = 4
  model, ref = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.adam(1e-2), k),
                            wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def micro_step(model, optimizer, mb):
    grads = nnx.grad(loss_fn)(model, mb)
    optimizer.update(model, grads)

  for i in range(2):
    batch = make_batch(i)
    before = nnx.state(model, nnx.Param)
    for j in range(k):
      if j:  # mid-window: the parameters do not move
        assert_states_close(nnx.state(model, nnx.Param), before, rtol=0,
                            atol=0)
      micro_step(model, optimizer, microbatch(batch, j, k))
    full_batch_step(ref, ref_opt, batch)
    assert_states_close(nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param))
  # optimizer.step counts micro-steps; the inner adam counts windows.
  assert int(optimizer.step[...]) == 2 * k
  assert inner_count(nnx.as_pure(optimizer.opt_state)) == 2


def test_optimizer_update_forwards_the_token_weight():
  """optimizer.update(model, grads, weight=n) reaches accumulate."""
  model, ref = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.5), 2),
                            wrt=nnx.Param)
  batch = make_batch(4)
  weights = (3.0, 1.0)
  grad_fn = nnx.jit(nnx.grad(loss_fn))
  grads = [grad_fn(model, microbatch(batch, j, 2)) for j in range(2)]
  update = nnx.jit(lambda opt, m, g, w: opt.update(m, g, weight=w))
  for g, w in zip(grads, weights, strict=True):
    update(optimizer, model, g, w)
  mean = jax.tree.map(lambda a, b: (3.0 * a + 1.0 * b) / 4.0, *grads)
  ref_opt = nnx.Optimizer(ref, optax.sgd(0.5), wrt=nnx.Param)
  nnx.jit(lambda opt, m, g: opt.update(m, g))(ref_opt, ref, mean)
  assert_states_close(nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param))


@pytest.mark.parametrize('k, plain_tx', [(2, False), (4, False), (4, True)])
def test_train_step_matches_full_batch(k, plain_tx):
  model, ref = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
  tx = optax.adam(1e-2)
  optimizer = nnx.Optimizer(
      model, tx if plain_tx else accum_jax.accumulate(tx, k), wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    return accum_jax.nnx_train_step(
        model, optimizer, batch, loss_fn,
        num_microbatches=k if plain_tx else None)

  for i in range(3):
    batch = make_batch(i)
    loss = step(model, optimizer, batch)
    ref_loss = full_batch_step(ref, ref_opt, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_states_close(nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param))
    assert int(optimizer.step[...]) == i + 1
    assert inner_count(nnx.as_pure(optimizer.opt_state)) == i + 1


def test_batch_norm_threaded_like_a_sequential_loop():
  k = 4
  model = MLP(nnx.Rngs(1), batch_norm=True)
  ref = MLP(nnx.Rngs(1), batch_norm=True)
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.adam(1e-2), k),
                            wrt=nnx.Param)
  ref_opt = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    return accum_jax.nnx_train_step(model, optimizer, batch, loss_fn)

  # Hand-written reference: k sequential nnx.value_and_grad calls, each
  # updating the model's BatchNorm statistics in place, then one update.
  @nnx.jit
  def ref_step(model, optimizer, batch):
    grads, losses = [], []
    for j in range(k):
      loss, g = nnx.value_and_grad(loss_fn)(
          model, microbatch(batch, j, k))
      grads.append(g)
      losses.append(loss)
    optimizer.update(model, jax.tree.map(lambda *g: sum(g) / k, *grads))
    return sum(losses) / k

  for i in range(2):
    batch = make_batch(20 + i)
    np.testing.assert_allclose(step(model, optimizer, batch),
                               ref_step(ref, ref_opt, batch), rtol=1e-5)
    assert_states_close(nnx.state(model), nnx.state(ref))
  assert not np.allclose(model.bn.mean[...], 0.0)
  assert int(optimizer.step[...]) == 2
  assert inner_count(nnx.as_pure(optimizer.opt_state)) == 2


def test_dropout_stream_gives_each_microbatch_its_own_mask():
  k = 2
  model = MLP(nnx.Rngs(0, dropout=5), dropout=0.5)
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.1), k),
                            wrt=nnx.Param)
  batch = {'x': jnp.ones((4, D)), 'y': jnp.zeros((4,), jnp.int32)}
  count = model.dropout.rngs.count[...]

  def loss_and_logits(model, mb):
    logits = model(mb['x'])  # one dropout draw per micro-batch
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, mb['y'])
    return loss.mean(), logits

  probe = nnx.clone(model)  # before the step: same params, same stream
  _, logits = nnx.jit(lambda m, o, b: accum_jax.nnx_train_step(
      m, o, b, loss_and_logits, has_aux=True, aux='stack'))(
          model, optimizer, batch)
  assert logits.shape == (k, 2, 3)
  assert not np.allclose(logits[0], logits[1])
  # The stream advanced once per micro-batch, as k sequential calls would.
  assert int(model.dropout.rngs.count[...]) == int(count) + k
  for j in range(k):
    np.testing.assert_allclose(logits[j], probe(batch['x'][j::k]), rtol=1e-6)


class TestErrors:

  def test_plain_tx_needs_accumulate_or_num_microbatches(self):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(TypeError, match='optimizer.tx is a '
                       'GradientTransformationExtraArgs, not an '
                       'accum_jax.accumulate transform'):
      accum_jax.nnx_train_step(model, optimizer, make_batch(), loss_fn)

  def test_needs_an_nnx_optimizer(self):
    model = MLP(nnx.Rngs(0))
    with pytest.raises(TypeError, match='expects an nnx.Optimizer.*got '
                       'GradientTransformation'):
      accum_jax.nnx_train_step(model, optax.sgd(0.1), make_batch(), loss_fn)

  def test_batch_not_divisible_by_k(self):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.1), 4),
                              wrt=nnx.Param)
    with pytest.raises(ValueError, match='batch size 6 is not divisible by '
                       'num_microbatches=4'):
      accum_jax.nnx_train_step(model, optimizer, make_batch(rows=6), loss_fn)

  def test_loss_returns_pair_without_has_aux(self):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.1), 4),
                              wrt=nnx.Param)
    with pytest.raises(TypeError, match='pass has_aux=True'):
      accum_jax.nnx_train_step(model, optimizer, make_batch(),
                               lambda m, mb: (loss_fn(m, mb), 0.0))
