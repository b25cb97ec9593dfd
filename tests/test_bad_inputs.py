"""Every error the library raises (the table in docs/robustness.md), and the
safe behaviour for inputs that cannot raise (traced negative weights)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax

K = 2


def loss_fn(params, batch):
  return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)


PARAMS = {'w': jnp.array([1.0, -2.0])}
BATCH = {'x': jnp.arange(8.0).reshape(4, 2), 'y': jnp.arange(4.0)}
BF16_PARAMS = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)


def tx_k(k=K, **kw):
  return accum_jax.accumulate(optax.adam(0.1), k, **kw)


def update(tx, grads=PARAMS, state=None, params=PARAMS, **kw):
  state = tx.init(PARAMS) if state is None else state
  return tx.update(grads, state, params, **kw)


def in_step(tx=None, state=None, loss=loss_fn, batch=BATCH, params=PARAMS,
            **kw):
  tx = tx_k() if tx is None else tx
  state = tx.init(params) if state is None else state
  return accum_jax.value_and_update(loss, tx, **kw)(params, state, batch)


def grad_k(loss=loss_fn, batch=BATCH, k=K, params=PARAMS, call_kw=None,
           **kw):
  return accum_jax.value_and_grad(loss, k, **kw)(params, batch,
                                                 **(call_kw or {}))


CASES = [
    # accumulate(...) arguments
    ('num_microbatches=0', lambda: tx_k(0), ValueError,
     'num_microbatches must be >= 1, got 0.'),
    ('num_microbatches=2.5', lambda: tx_k(2.5), TypeError,
     'num_microbatches must be a Python int >= 1, got 2.5 of type float.'),
    ('num_microbatches=True', lambda: tx_k(True), TypeError,
     'num_microbatches must be a Python int >= 1, got True.'),
    ('integer accumulator_dtype',
     lambda: tx_k(accumulator_dtype=jnp.int32), TypeError,
     'accumulator_dtype must be a floating dtype, got int32.'),
    ('inner not an optax transform',
     lambda: accum_jax.accumulate(lambda g: g, K), TypeError,
     'accumulate expects an optax.GradientTransformation as inner, got '
     'function.'),
    ('unknown nonfinite policy', lambda: tx_k(nonfinite='skip'), ValueError,
     "nonfinite must be one of 'propagate', 'skip_microbatch', 'skip_step'; "
     "got 'skip'."),
    # params / grads / state
    ('integer params leaf',
     lambda: tx_k().init({'w': PARAMS['w'], 'n': jnp.int32(3)}), TypeError,
     "Params leaf ['n'] has dtype int32; accum_jax accumulates floating-point "
     'gradients only.'),
    ('integer grads leaf',
     lambda: update(tx_k(), grads={'w': jnp.array([1, 2])}), TypeError,
     "Gradient leaf ['w'] has dtype int32"),
    ('grads of another structure',
     lambda: update(tx_k(), grads={'v': PARAMS['w']}), ValueError,
     'The grads pytree does not match the params it was initialised with'),
    ('grads of another shape',
     lambda: update(tx_k(), grads={'w': jnp.zeros(3)}), ValueError,
     "The grads leaf ['w'] has shape (3,) but the params has shape (2,)."),
    ('params of another structure',
     lambda: update(tx_k(), params={'v': PARAMS['w']}), ValueError,
     'The params pytree does not match the accumulator it was initialised '
     'with'),
    ('state not an AccumulateState',
     lambda: update(tx_k(), state=optax.adam(0.1).init(PARAMS)), TypeError,
     'accumulate.update expects an AccumulateState'),
    ('state from accumulate with another accumulator dtype',
     lambda: update(tx_k(), state=tx_k(accumulator_dtype=None).init(
         BF16_PARAMS), grads=BF16_PARAMS, params=BF16_PARAMS), ValueError,
     "The AccumulateState's accumulator leaf ['w'] has dtype bfloat16, but "
     'this accumulate sums bfloat16 gradients in float32'),
    ('state from accumulate with another inner optimizer',
     lambda: update(tx_k(),
                    state=accum_jax.accumulate(optax.sgd(0.1), K).init(PARAMS)),
     ValueError, "The AccumulateState's inner_state does not match this "
     "accumulate's inner optimizer"),
    # weights
    ('non-scalar weight', lambda: update(tx_k(), weight=jnp.ones(2)),
     ValueError, 'A micro-batch weight must be a scalar, got an array of '
     'shape (2,).'),
    ('negative concrete weight', lambda: update(tx_k(), weight=-1.0),
     ValueError, 'A micro-batch weight must be >= 0, got -1.0.'),
    ('weight_fn of the wrong shape',
     lambda: in_step(weight_fn=lambda mb: mb['y']), ValueError,
     'weight_fn must return a scalar weight per micro-batch, got an array of '
     'shape (2,).'),
    ('weight_fn with a negative constant',
     lambda: grad_k(weight_fn=lambda mb: -1.0), ValueError,
     'The weight_fn weight must be >= 0, got -1.0.'),
    # windows
    ('end_window not a scalar',
     lambda: update(tx_k(), end_window=jnp.array([True, False])), ValueError,
     'end_window must be a scalar bool, got an array of shape (2,).'),
    ('schedule returning a float',
     lambda: update(accum_jax.accumulate(optax.sgd(1.0), lambda s: 2.0)),
     TypeError, 'A num_microbatches schedule must return an integer scalar, '
     'got shape () and dtype float32.'),
    ('schedule in value_and_update',
     lambda: accum_jax.value_and_update(
         loss_fn, accum_jax.accumulate(optax.sgd(1.0), lambda s: 2)),
     TypeError, 'value_and_update runs a fixed number of micro-batches per '
     'step, but tx was built with a num_microbatches schedule.'),
    ('num_real_microbatches out of range',
     lambda: grad_k(call_kw={'num_real_microbatches': 3}), ValueError,
     'num_real_microbatches must be in [0, 2] (num_microbatches), got 3.'),
    ('num_real_microbatches not an integer',
     lambda: grad_k(call_kw={'num_real_microbatches': 1.0}), TypeError,
     'num_real_microbatches must be an integer scalar, got shape () and '
     'dtype float32.'),
    ('flush on a non-accumulate transform',
     lambda: accum_jax.flush(optax.sgd(1.0), optax.sgd(1.0).init(PARAMS)),
     TypeError, 'flush needs a transform made by accum_jax.accumulate'),
    ('flush on another state',
     lambda: accum_jax.flush(tx_k(), optax.sgd(1.0).init(PARAMS)),
     TypeError, 'flush expects an AccumulateState, got tuple.'),
    # in-step drivers
    ('value_and_update with a plain optimizer',
     lambda: accum_jax.value_and_update(loss_fn, optax.adam(0.1)), TypeError,
     'value_and_update needs a transform made by accum_jax.accumulate(inner, '
     'num_microbatches), got GradientTransformationExtraArgs.'),
    ('value_and_update with another state',
     lambda: in_step(state=optax.adam(0.1).init(PARAMS)), TypeError,
     'value_and_update expects the AccumulateState made by tx.init, got '
     'tuple.'),
    ('value_and_update with a state of another accumulator dtype',
     lambda: in_step(state=tx_k(accumulator_dtype=None).init(BF16_PARAMS),
                     params=BF16_PARAMS), ValueError,
     "The AccumulateState's accumulator leaf ['w'] has dtype bfloat16"),
    ('batch not divisible by k',
     lambda: grad_k(k=3), ValueError,
     'The batch size 4 is not divisible by num_microbatches=3'),
    ('scalar batch leaf',
     lambda: grad_k(batch={**BATCH, 's': jnp.float32(1)}), ValueError,
     "Batch leaf ['s'] is a scalar; every batch leaf needs a leading batch "
     'axis.'),
    ('batch leaves of different sizes',
     lambda: grad_k(batch={**BATCH, 'y': jnp.arange(6.0)}), ValueError,
     'All batch leaves must share the leading (batch) size; got different '
     'sizes'),
    ('empty batch', lambda: grad_k(batch={}), ValueError,
     'The batch has no array leaves to split into micro-batches.'),
    ('integer params in value_and_grad',
     lambda: grad_k(loss=lambda p, b: jnp.mean(b['y']),
                    params={'n': jnp.array([1, 2])}), TypeError,
     "Params leaf ['n'] has dtype int32"),
    ('loss_fn returns (loss, aux) without has_aux',
     lambda: grad_k(loss=lambda p, b: (loss_fn(p, b), 0.0)), TypeError,
     'loss_fn returned a tuple of length 2; if it returns (loss, aux), pass '
     'has_aux=True.'),
    ('has_aux=True but loss_fn returns a scalar',
     lambda: grad_k(has_aux=True), TypeError,
     'With has_aux=True, loss_fn must return a pair (loss, aux); got a single '
     'array of shape ().'),
    ('non-scalar loss',
     lambda: grad_k(loss=lambda p, b: b['x'] @ p['w']), TypeError,
     'loss_fn must return a scalar loss, got shape (2,).'),
    ('integer loss',
     lambda: grad_k(loss=lambda p, b: jnp.int32(1)), TypeError,
     'loss_fn must return a floating loss, got int32.'),
]


@pytest.mark.parametrize('call,exc,message', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_error(call, exc, message):
  with pytest.raises(exc, match=re.escape(message)):
    call()


def test_docs_table_lists_every_error():
  docs = pathlib.Path(__file__).parent.parent / 'docs' / 'robustness.md'
  text = docs.read_text()
  missing = [name for name, _, _, message in CASES if message[:30] not in text]
  assert not missing


def test_errors_also_raise_under_jit():
  tx2 = tx_k(2)
  with pytest.raises(ValueError, match=re.escape(
      "The AccumulateState's accumulator leaf ['w'] has dtype bfloat16")):
    jax.jit(tx2.update)(BF16_PARAMS,
                        tx_k(accumulator_dtype=None).init(BF16_PARAMS),
                        BF16_PARAMS)
  with pytest.raises(ValueError, match='weight_fn must return a scalar'):
    jax.jit(accum_jax.value_and_update(loss_fn, tx2,
                                       weight_fn=lambda mb: mb['y']))(
        PARAMS, tx2.init(PARAMS), BATCH)


@pytest.mark.parametrize('policy', ['propagate', 'skip_step'])
def test_traced_negative_weight_counts_as_zero(policy):
  """Under jit a negative weight cannot raise: the micro-batch is dropped
  (weight 0), which is not a non-finite skip."""
  tx = accum_jax.accumulate(optax.sgd(1.0), 3, nonfinite=policy)
  update = jax.jit(tx.update)
  g = [{'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([5.0, 5.0])},
       {'w': jnp.array([3.0, 0.0])}]
  state = tx.init(PARAMS)
  for grads, w in zip(g, (1.0, -4.0, 3.0), strict=False):
    updates, state = update(grads, state, PARAMS, weight=jnp.float32(w))
  np.testing.assert_allclose(updates['w'], -(1.0 * g[0]['w'] + 3.0 * g[2]['w'])
                             / 4.0, rtol=1e-6)
  assert int(state.skipped_microbatches) == 0
  assert int(state.skipped_steps) == 0


def test_traced_negative_weight_fn_counts_as_zero_in_step():
  batch = {**BATCH, 'w': jnp.array([2.0, -1.0, 2.0, -1.0])}  # mb 1 weighs -1
  tx = accum_jax.accumulate(optax.sgd(1.0), K)
  loss, updates, _ = jax.jit(accum_jax.value_and_update(
      loss_fn, tx, weight_fn=lambda mb: mb['w'][0]))(
          PARAMS, tx.init(PARAMS), batch)
  first = jax.tree.map(lambda x: x[0::K], BATCH)  # micro-batch 0 alone
  ref_loss, ref_grads = jax.value_and_grad(loss_fn)(PARAMS, first)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(updates['w'], -ref_grads['w'], rtol=1e-6)
