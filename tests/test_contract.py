"""Contract tests: public-API behaviour that code written elsewhere relies on.

Each group checks one promise against an independent reference (the
full-batch computation, the inner optimizer on its own, optax.MultiSteps, a
hand-computed value), through the public ``accum_jax`` API only.
"""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from accum_jax import _compat
from tests import _helpers
from tests._helpers import assert_trees_equal

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _name(dtype):
  return jnp.dtype(dtype).name


def mse(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  return jnp.mean((pred - batch['y']) ** 2)


def small_params():
  return {'w': jnp.array([[0.5], [-0.25]]), 'b': jnp.array([0.1])}


def small_batch(n=8):
  x = jnp.arange(2.0 * n).reshape(n, 2) / (2 * n)
  return {'x': x, 'y': x @ jnp.array([[1.0], [-1.0]]) + 0.3}


def assert_trees_close(a, b, rtol, atol=0.0):
  _helpers.assert_trees_close(a, b, rtol=rtol, atol=atol)


# Item 1: flax.serialization round-trips a TrainState with an accumulate
# opt_state and resumes bit-identically; the state holds arrays only.

def _grads(i):
  return {'w': jnp.array([[0.3 * i - 1.0], [0.7 - 0.1 * i]]),
          'b': jnp.array([0.2 * i - 0.5])}


@pytest.mark.parametrize('steps_before', [4, 2],
                         ids=['window_boundary', 'mid_window'])
def test_flax_serialization_round_trip_resumes_bit_identically(steps_before):
  serialization = pytest.importorskip('flax.serialization')
  train_state = pytest.importorskip('flax.training.train_state')
  tx = accum_jax.accumulate(optax.adam(1e-2), 4)

  def create():
    return train_state.TrainState.create(apply_fn=None,
                                         params=small_params(), tx=tx)

  apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  state = create()
  for i in range(steps_before):
    state = apply(state, _grads(i))
  assert int(state.opt_state.count) == steps_before % 4

  data = serialization.to_bytes(state)
  restored = serialization.from_bytes(create(), data)
  assert_trees_equal(restored, state)

  for i in range(steps_before, steps_before + 3):
    state = apply(state, _grads(i))
    restored = apply(restored, _grads(i))
  for name in ('w', 'b'):
    np.testing.assert_array_equal(restored.params[name], state.params[name])
  assert_trees_equal(restored.opt_state, state.opt_state)


def test_opt_state_holds_arrays_only():
  serialization = pytest.importorskip('flax.serialization')
  tx = accum_jax.accumulate(optax.adam(1e-2), 4)
  opt_state = tx.init(small_params())
  for leaf in jax.tree.leaves(opt_state):
    assert isinstance(leaf, jax.Array), type(leaf)

  state_dict = serialization.to_state_dict(opt_state)
  not_arrays = []

  def walk(node, path):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, f'{path}/{key}')
    elif not isinstance(node, (jax.Array, np.ndarray)):
      not_arrays.append((path, type(node).__name__))

  walk(state_dict, '')
  assert not not_arrays
  restored = serialization.from_state_dict(tx.init(small_params()),
                                           state_dict)
  assert_trees_equal(restored, opt_state)


# Item 2: an accumulate nested in another transform is never silent: the
# in-step drivers raise a TypeError with the rewrite, and refuse
# num_microbatches= on a transform that contains an accumulate.

def _labels(tree):
  return jax.tree.map(lambda p: 'a' if jnp.ndim(p) >= 2 else 'b', tree)


def _nested_tx(kind):
  if kind == 'chain':
    return optax.chain(optax.clip_by_global_norm(1.0),
                       accum_jax.accumulate(optax.adamw(1e-3), 4))
  if kind == 'inject_hyperparams':
    return optax.inject_hyperparams(
        lambda learning_rate: accum_jax.accumulate(
            optax.adamw(learning_rate), 4))(learning_rate=1e-3)
  return optax.multi_transform(
      {'a': accum_jax.accumulate(optax.adamw(1e-3), 4),
       'b': accum_jax.accumulate(optax.sgd(1e-3), 4)}, _labels)


NESTED = [
    ('chain', r'accumulate\(optax\.chain\('),
    ('inject_hyperparams', r'accumulate\(optax\.inject_hyperparams\('),
    ('multi_transform', r'accumulate\(optax\.multi_transform\('),
]


def _linen_setup(tx):
  nn = pytest.importorskip('flax.linen')
  train_state = pytest.importorskip('flax.training.train_state')
  model = nn.Dense(1)
  batch = small_batch()
  params = model.init(jax.random.key(0), batch['x'])['params']

  def loss_fn(params, mb):
    pred = model.apply({'params': params}, mb['x'])
    return jnp.mean((pred - mb['y']) ** 2)

  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  return state, batch, loss_fn


def _nnx_setup(tx):
  pytest.importorskip('flax', minversion='0.12.7')  # nnx_train_step's floor
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, mb):
    return jnp.mean((model(mb['x']) - mb['y']) ** 2)

  return nnx, model, optimizer, loss_fn


@pytest.mark.parametrize('kind, match', NESTED, ids=[n for n, _ in NESTED])
def test_nested_accumulate_value_and_update_names_the_rewrite(kind, match):
  tx = _nested_tx(kind)
  params = small_params()
  with pytest.raises(TypeError, match=match):
    step = jax.jit(accum_jax.value_and_update(mse, tx))
    step(params, tx.init(params), small_batch())


@pytest.mark.parametrize('kind, match', NESTED, ids=[n for n, _ in NESTED])
def test_nested_accumulate_linen_train_step_names_the_rewrite(kind, match):
  state, batch, loss_fn = _linen_setup(_nested_tx(kind))
  with pytest.raises(TypeError, match=match):
    jax.jit(lambda s, b: accum_jax.linen_train_step(s, b, loss_fn))(state,
                                                                    batch)


def test_nnx_train_step_below_its_flax_floor_names_it():
  flax = pytest.importorskip('flax')
  nnx = pytest.importorskip('flax.nnx')
  if hasattr(nnx, 'as_pure'):
    pytest.skip('flax >= 0.12.7 runs nnx_train_step (tests/test_flax_nnx.py)')
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = accum_jax.accumulate(optax.sgd(0.1), 2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with pytest.raises(ImportError, match=r'flax >= 0\.12\.7.*this flax is '
                     + re.escape(flax.__version__)):
    accum_jax.nnx_train_step(model, optimizer, small_batch(),
                             lambda m, mb: jnp.mean(m(mb['x']) ** 2))


@pytest.mark.parametrize('kind, match', NESTED, ids=[n for n, _ in NESTED])
def test_nested_accumulate_nnx_train_step_names_the_rewrite(kind, match):
  nnx, model, optimizer, loss_fn = _nnx_setup(_nested_tx(kind))
  with pytest.raises(TypeError, match=match):
    nnx.jit(lambda m, o, b: accum_jax.nnx_train_step(m, o, b, loss_fn))(
        model, optimizer, small_batch())


@pytest.mark.parametrize('kind', [n for n, _ in NESTED])
def test_num_microbatches_refused_for_tx_containing_accumulate_linen(kind):
  state, batch, loss_fn = _linen_setup(_nested_tx(kind))
  with pytest.raises(TypeError, match=r'contains an accum_jax\.accumulate'):
    jax.jit(lambda s, b: accum_jax.linen_train_step(
        s, b, loss_fn, num_microbatches=4))(state, batch)


@pytest.mark.parametrize('kind', [n for n, _ in NESTED])
def test_num_microbatches_refused_for_tx_containing_accumulate_nnx(kind):
  nnx, model, optimizer, loss_fn = _nnx_setup(_nested_tx(kind))
  with pytest.raises(TypeError, match=r'contains an accum_jax\.accumulate'):
    nnx.jit(lambda m, o, b: accum_jax.nnx_train_step(
        m, o, b, loss_fn, num_microbatches=4))(model, optimizer,
                                               small_batch())


# Item 3: updates have the dtypes the inner optimizer returns on its own, over
# param dtype x gradient dtype x adam mu_dtype (mid-window zeros and window
# end, cross-step; in-step for gradients of the params' dtype).

@pytest.mark.parametrize('mu_dtype', DTYPES, ids=_name)
@pytest.mark.parametrize('param_dtype', DTYPES, ids=_name)
def test_update_dtypes_are_the_inner_optimizers(param_dtype, mu_dtype):
  inner = optax.adam(1e-3, mu_dtype=mu_dtype)
  tx = accum_jax.accumulate(optax.adam(1e-3, mu_dtype=mu_dtype), 2)
  params = jnp.ones(3, param_dtype)
  wrong = []

  def cross_step(grads, params):
    state = tx.init(params)
    mid, state = tx.update(grads, state, params)
    end, state = tx.update(grads, state, params)
    return mid, end

  # Shapes and dtypes only: jax.eval_shape traces without compiling.
  for grad_dtype in DTYPES:
    grads = jnp.ones(3, grad_dtype)
    expected, _ = jax.eval_shape(inner.update, grads, inner.init(params),
                                 params)
    mid, end = jax.eval_shape(cross_step, grads, params)
    for where, got in (('mid-window', mid), ('window end', end)):
      if got.dtype != expected.dtype:
        wrong.append(f'grads {_name(grad_dtype)}, {where}: '
                     f'{_name(got.dtype)} != {_name(expected.dtype)}')

  def loss_fn(p, batch):
    return jnp.mean((batch @ p.astype(jnp.float32)) ** 2)

  batch = jnp.ones((4, 3), jnp.float32)
  expected, _ = jax.eval_shape(inner.update, params, inner.init(params),
                               params)
  _, updates, _ = jax.eval_shape(accum_jax.value_and_update(loss_fn, tx),
                                 params, tx.init(params), batch)
  if updates.dtype != expected.dtype:
    wrong.append(f'in-step: {_name(updates.dtype)} != '
                 f'{_name(expected.dtype)}')
  assert not wrong


def test_bf16_gradients_match_multisteps():
  params = {'w': jnp.array([0.5, -1.0, 2.0, 0.25]), 'b': jnp.array([1.0])}
  # Small integers and halves: exact in bfloat16, and so are their means.
  grads = [
      {'w': jnp.array([1.0, -2.0, 4.0, 0.5], jnp.bfloat16),
       'b': jnp.array([3.0], jnp.bfloat16)},
      {'w': jnp.array([3.0, 2.0, -8.0, 1.5], jnp.bfloat16),
       'b': jnp.array([-1.0], jnp.bfloat16)},
  ]
  tx = accum_jax.accumulate(optax.adam(1e-3), 2)
  ms = optax.MultiSteps(optax.adam(1e-3), 2)
  update, ms_update = jax.jit(tx.update), jax.jit(ms.update)
  state, ms_state = tx.init(params), ms.init(params)
  for g in grads:
    updates, state = update(g, state, params)
    ms_updates, ms_state = ms_update(g, ms_state, params)
  # The inner optimizer gets the mean cast back to bfloat16 (exact here).
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(mean))
  adam = optax.adam(1e-3)
  want, _ = jax.jit(adam.update)(mean, adam.init(params), params)
  assert_trees_close(updates, want, rtol=1e-6)
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  if 'accumulator_dtype' not in inspect.signature(optax.MultiSteps).parameters:
    # Before optax 0.2.8 MultiSteps gives its inner optimizer the float32
    # mean; optax 0.2.5's adam rounds (1 - b1) * g in bfloat16 for our
    # bfloat16 mean, and the two updates are 1.25e-3 (relative) apart.
    pytest.skip('MultiSteps casts the mean to the gradients\' dtype from '
                'optax 0.2.8')
  assert_trees_close(updates, ms_updates, rtol=1e-6)
  for name in ('w', 'b'):
    assert updates[name].dtype == ms_updates[name].dtype == jnp.float32


# Item 4: under jax_enable_x64 the loss and floating aux are summed in
# float64, as the gradients are.

@pytest.mark.parametrize('k', [1, 4])
def test_float64_value_and_aux_have_float64_precision(k):
  with _compat.enable_x64(True):
    # Thirds and sevenths: float32 rounding shows at ~1e-8 relative.
    x = jnp.arange(24, dtype=jnp.float64).reshape(8, 3) / 7.0
    batch = {'x': x, 'y': jnp.sin(jnp.arange(8, dtype=jnp.float64))}
    w = jnp.array([1.0 / 3.0, -2.0 / 9.0, 0.1], jnp.float64)

    def loss_fn(w, batch):
      pred = batch['x'] @ w
      return jnp.mean((pred - batch['y']) ** 2), {'pred': jnp.mean(pred)}

    (loss, aux), grads = accum_jax.value_and_grad(loss_fn, k, has_aux=True)(
        w, batch)
    (ref_loss, ref_aux), ref_grads = jax.value_and_grad(
        loss_fn, has_aux=True)(w, batch)
    assert loss.dtype == aux['pred'].dtype == jnp.float64
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    np.testing.assert_allclose(aux['pred'], ref_aux['pred'], rtol=1e-13)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-13)


# Item 5: a NaN weight under 'propagate' propagates; under the skip policies
# it is dropped and counted.

def _count(inner_state):
  return int(optax.tree_utils.tree_get(inner_state, 'count'))


def test_nan_weight_propagates_cross_step():
  tx = accum_jax.accumulate(optax.adam(1e-2), 2)
  params = small_params()
  state = tx.init(params)
  _, state = tx.update(_grads(0), state, params, weight=jnp.nan)
  updates, state = tx.update(_grads(1), state, params)
  for leaf in jax.tree.leaves(updates):
    assert bool(jnp.all(jnp.isnan(leaf)))
  assert _count(state.inner_state) == 1
  assert int(state.skipped_steps) == 0


def _id_batch(k=4, rows=2):
  """A batch whose micro-batch j (strided split) has every 'id' equal to j."""
  batch = small_batch(k * rows)
  batch['id'] = jnp.arange(k * rows) % k
  return batch


def _nan_for_microbatch_1(mb):
  return jnp.where(mb['id'][0] == 1, jnp.nan, 1.0)


def test_nan_weight_propagates_in_step():
  tx = accum_jax.accumulate(optax.adam(1e-2), 4)
  params = small_params()
  step = jax.jit(accum_jax.value_and_update(mse, tx,
                                            weight_fn=_nan_for_microbatch_1))
  loss, updates, _ = step(params, tx.init(params), _id_batch())
  assert bool(jnp.isnan(loss))
  for leaf in jax.tree.leaves(updates):
    assert bool(jnp.all(jnp.isnan(leaf)))


def test_nan_weight_skip_microbatch_drops_and_counts_it():
  tx = accum_jax.accumulate(optax.sgd(0.1), 4, nonfinite='skip_microbatch')
  params = small_params()
  batch = _id_batch()
  step = jax.jit(accum_jax.value_and_update(mse, tx,
                                            weight_fn=_nan_for_microbatch_1))
  _, updates, state = step(params, tx.init(params), batch)
  # Reference: the same step on the rows of the other three micro-batches.
  kept = jax.tree.map(lambda a: a[batch['id'] != 1], batch)
  expected = jax.tree.map(lambda g: -0.1 * g, jax.grad(mse)(params, kept))
  assert int(state.skipped_microbatches) == 1
  assert_trees_close(updates, expected, rtol=1e-6)


def test_nan_weight_skip_step_skips_and_counts_the_window():
  tx = accum_jax.accumulate(optax.adam(1e-2), 4, nonfinite='skip_step')
  params = small_params()
  state0 = tx.init(params)
  step = jax.jit(accum_jax.value_and_update(mse, tx,
                                            weight_fn=_nan_for_microbatch_1))
  _, updates, state = step(params, state0, _id_batch())
  assert int(state.skipped_steps) == 1
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, jnp.zeros_like(leaf))
  assert_trees_equal(state.inner_state, state0.inner_state)


# Item 6: errors at trace time name the argument and the fix; inputs that
# jax.value_and_grad accepts are accepted.

def test_python_float_loss_is_accepted():
  def loss_fn(params, batch):
    return 2.0

  params, batch = small_params(), small_batch()
  loss, grads = accum_jax.value_and_grad(loss_fn, 4)(params, batch)
  ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, batch)
  np.testing.assert_array_equal(loss, ref_loss)
  assert_trees_equal(grads, ref_grads)


def test_dict_loss_is_a_clear_type_error():
  def loss_fn(params, batch):
    return {'loss': mse(params, batch)}

  with pytest.raises(TypeError, match='loss_fn must return a scalar') as e:
    accum_jax.value_and_grad(loss_fn, 4)(small_params(), small_batch())
  assert 'dict' in str(e.value)


def test_weight_fn_returning_none_is_a_clear_type_error():
  with pytest.raises(TypeError, match='weight_fn'):
    accum_jax.value_and_grad(mse, 4, weight_fn=lambda mb: None)(
        small_params(), small_batch())


@pytest.mark.parametrize('name, equivalent', [
    ('full', True), ('none', None), ('dots_saveable',
                                     jax.checkpoint_policies.dots_saveable),
])
def test_remat_names_printed_by_the_planner_are_accepted(name, equivalent):
  params, batch = small_params(), small_batch()
  got = accum_jax.value_and_grad(mse, 4, remat=name)(params, batch)
  ref = accum_jax.value_and_grad(mse, 4, remat=equivalent)(params, batch)
  assert_trees_close(got, ref, rtol=1e-6)
  assert_trees_close(got, jax.value_and_grad(mse)(params, batch), rtol=1e-5)


def test_unknown_remat_name_is_a_value_error():
  with pytest.raises(ValueError, match='remat'):
    accum_jax.value_and_grad(mse, 4, remat='everything')(small_params(),
                                                         small_batch())


def test_integer_accumulator_dtype_is_refused():
  with pytest.raises(TypeError, match='accumulator_dtype'):
    accum_jax.value_and_grad(mse, 4, accumulator_dtype=jnp.int32)


def _planner_make_step(k, remat):
  tx = accum_jax.accumulate(optax.sgd(0.1), k)
  return accum_jax.value_and_update(
      lambda w, b: jnp.mean((b @ w) ** 2), tx, remat=remat)


def _plan(batch, num_microbatches):
  w = jnp.zeros((4, 2))
  state = accum_jax.accumulate(optax.sgd(0.1), 1).init(w)
  return accum_jax.plan_microbatches(
      _planner_make_step, w, state, batch, batch_argnum=2,
      budget_bytes=10**9, num_microbatches=num_microbatches, remat=(None,),
      print_fn=None)


def test_planner_empty_num_microbatches_is_a_value_error():
  with pytest.raises(ValueError):
    _plan(jax.ShapeDtypeStruct((8, 4), jnp.float32), [])


def test_planner_zero_row_batch_is_a_value_error():
  with pytest.raises(ValueError):
    _plan(jax.ShapeDtypeStruct((0, 4), jnp.float32), None)


def test_planner_fractional_num_microbatches_is_a_type_error():
  with pytest.raises(TypeError, match='num_microbatches'):
    _plan(jax.ShapeDtypeStruct((8, 4), jnp.float32), [2.5])


def test_equinox_module_as_params_names_the_leaf():
  eqx = pytest.importorskip('equinox')
  model = eqx.nn.MLP(2, 1, 8, 2, key=jax.random.key(0))

  def loss_fn(model, batch):
    return jnp.mean(jax.vmap(model)(batch['x']) ** 2)

  with pytest.raises(TypeError, match='eqx.filter') as e:
    accum_jax.value_and_grad(loss_fn, 4)(model, small_batch())
  assert 'activation' in str(e.value)


def test_state_with_another_accumulator_dtype_is_refused():
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  state = accum_jax.accumulate(optax.sgd(1.0), 2,
                               accumulator_dtype=None).init(params)
  tx = accum_jax.accumulate(optax.sgd(1.0), 2)
  with pytest.raises(ValueError, match='accumulator'):
    tx.update(params, state, params)

  def loss_fn(p, batch):
    return jnp.mean(batch @ p['w'].astype(jnp.float32))

  with pytest.raises(ValueError, match='accumulator'):
    accum_jax.value_and_update(loss_fn, tx)(params, state, jnp.ones((4, 3)))


def test_python_scalar_arguments_raise_no_deprecation_warning():
  tx = accum_jax.accumulate(optax.sgd(1.0), 2)
  params = small_params()
  # partial keeps the Python scalars Python scalars when traced.
  update = jax.jit(functools.partial(tx.update, weight=1.0))
  state = tx.init(params)
  _, state = update(_grads(0), state, params)
  updates, state = update(_grads(1), state, params)
  expected = jax.tree.map(lambda a, b: -(a + b) / 2, _grads(0), _grads(1))
  assert_trees_close(updates, expected, rtol=1e-6)

  batch = small_batch()
  loss, grads = jax.jit(functools.partial(
      accum_jax.value_and_grad(mse, 4), num_real_microbatches=2))(params, batch)
  # Micro-batches 0 and 1 of the strided split: rows with row % 4 < 2.
  real = jax.tree.map(lambda a: a[np.arange(8) % 4 < 2], batch)
  ref_loss, ref_grads = jax.value_and_grad(mse)(params, real)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_trees_close(grads, ref_grads, rtol=1e-6)


# Item 10: a finite full-batch mean stays finite however large, where the
# sum of the k micro-batch means would overflow float32.

def test_huge_mean_loss_stays_finite():
  x = jnp.linspace(1.6e38, 1.7e38, 16, dtype=jnp.float32)
  params = {'w': jnp.float32(1.0)}

  def loss_fn(params, batch):
    # A mean, written so that the full batch's own sum does not overflow.
    return jnp.sum(batch / batch.shape[0] * params['w'])

  # The value is a running mean, so it stays finite. The gradient is a sum in
  # the accumulator (a parameter-sized buffer updated in place, shared with
  # cross-step windows), so a gradient this close to the float32 maximum
  # still overflows: that is left to a float64 accumulator_dtype under x64.
  loss, _ = accum_jax.value_and_grad(loss_fn, 8)(params, x)
  ref_loss = loss_fn(params, x)
  assert bool(jnp.isfinite(ref_loss))
  assert bool(jnp.isfinite(loss))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)

