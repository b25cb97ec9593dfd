"""Bad input gets a clear error at trace time, naming what was wrong."""

import jax
import jax.numpy as jnp
import optax
import pytest

import accum_jax


def loss_fn(params, batch):
  return jnp.mean((batch['x'] @ params['w']) ** 2)


PARAMS = {'w': jnp.ones((3, 2))}


def _batch(n):
  return {'x': jnp.ones((n, 3))}


def test_batch_not_divisible_names_both_numbers():
  with pytest.raises(ValueError, match=r'batch size 10 is not divisible by '
                     r'num_microbatches=4'):
    accum_jax.value_and_grad(loss_fn, 4)(PARAMS, _batch(10))
  tx = accum_jax.accumulate(optax.sgd(0.1), 3)
  with pytest.raises(ValueError, match=r'batch size 10 .* num_microbatches=3'):
    jax.jit(accum_jax.value_and_update(loss_fn, tx))(PARAMS, tx.init(PARAMS),
                                                     _batch(10))


def test_batch_leaves_with_different_leading_sizes():
  batch = {'x': jnp.ones((8, 3)), 'y': jnp.ones((6,))}
  with pytest.raises(ValueError, match=r"leading.*\['x'\]: 8.*\['y'\]: 6"):
    accum_jax.value_and_grad(lambda p, b: loss_fn(p, b), 2)(PARAMS, batch)


def test_scalar_batch_leaf():
  with pytest.raises(ValueError, match=r"\['t'\] is a scalar"):
    accum_jax.value_and_grad(loss_fn, 2)(PARAMS, {'x': jnp.ones((4, 3)),
                                                  't': jnp.float32(1.0)})


@pytest.mark.parametrize('k, error, match', [
    (0, ValueError, 'must be >= 1, got 0'),
    (-2, ValueError, 'must be >= 1, got -2'),
    (2.5, TypeError, 'must be a Python int >= 1, got 2.5'),
    ('4', TypeError, "got '4' of type str"),
    (True, TypeError, 'got True'),
])
def test_bad_num_microbatches(k, error, match):
  with pytest.raises(error, match=match):
    accum_jax.accumulate(optax.sgd(0.1), k)
  with pytest.raises(error, match=match):
    accum_jax.value_and_grad(loss_fn, k)


def test_numpy_int_num_microbatches_is_accepted():
  import numpy as np
  assert accum_jax.accumulate(optax.sgd(0.1), np.int64(4)).num_microbatches == 4


def test_non_floating_param_leaf():
  params = {'w': jnp.ones((3, 2)), 'step': jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match=r"Params leaf \['step'\] has dtype int32"):
    accum_jax.accumulate(optax.sgd(0.1), 2).init(params)
  with pytest.raises(TypeError, match=r"Params leaf \['step'\] has dtype int32"):
    accum_jax.value_and_grad(loss_fn, 2)(params, _batch(4))


def test_non_floating_gradient_leaf():
  tx = accum_jax.accumulate(optax.sgd(0.1), 2)
  state = tx.init(PARAMS)
  with pytest.raises(TypeError, match=r"Gradient leaf \['w'\] has dtype int32"):
    tx.update({'w': jnp.ones((3, 2), jnp.int32)}, state)


def test_value_and_update_needs_an_accumulate_transform():
  with pytest.raises(TypeError, match=r'made by accum_jax.accumulate.*got '
                     r'GradientTransformationExtraArgs'):
    accum_jax.value_and_update(loss_fn, optax.adam(1e-3))
  with pytest.raises(TypeError, match='got MultiSteps'):
    accum_jax.value_and_update(loss_fn, optax.MultiSteps(optax.adam(1e-3), 2))


def test_value_and_update_needs_the_accumulate_state():
  tx = accum_jax.accumulate(optax.adam(1e-3), 2)
  with pytest.raises(TypeError, match='expects the AccumulateState'):
    accum_jax.value_and_update(loss_fn, tx)(
        PARAMS, optax.adam(1e-3).init(PARAMS), _batch(4))


def test_grads_params_structure_mismatch():
  tx = accum_jax.accumulate(optax.sgd(0.1), 2)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match='grads pytree does not match'):
    tx.update({'v': jnp.ones((3, 2))}, state)
  with pytest.raises(ValueError, match=r"grads leaf \['w'\] has shape \(2, 3\)"):
    tx.update({'w': jnp.ones((2, 3))}, state)
  with pytest.raises(ValueError, match='params pytree does not match'):
    tx.update(PARAMS, state, {'w': PARAMS['w'], 'b': jnp.ones(2)})
  with pytest.raises(ValueError, match='params pytree does not match'):
    accum_jax.value_and_update(loss_fn, tx)(
        {'w': PARAMS['w'], 'b': jnp.ones(2)}, state, _batch(4))


def test_state_from_another_transform():
  tx = accum_jax.accumulate(optax.sgd(0.1), 2)
  with pytest.raises(TypeError, match='expects an AccumulateState'):
    tx.update(PARAMS, optax.sgd(0.1).init(PARAMS))


def test_non_scalar_weights():
  tx = accum_jax.accumulate(optax.sgd(0.1), 2)
  with pytest.raises(ValueError, match=r'weight must be a scalar.*\(2,\)'):
    tx.update(PARAMS, tx.init(PARAMS), weight=jnp.ones(2))
  with pytest.raises(ValueError, match=r'weight_fn must return a scalar.*\(2,\)'):
    accum_jax.value_and_grad(loss_fn, 2, weight_fn=lambda mb: mb['x'][:, 0])(
        PARAMS, _batch(4))


def test_loss_fn_output_structure():
  with pytest.raises(TypeError, match='pass has_aux=True'):
    accum_jax.value_and_grad(lambda p, b: (loss_fn(p, b), {}), 2)(
        PARAMS, _batch(4))
  with pytest.raises(TypeError, match=r'has_aux=True, loss_fn must return a '
                     r'pair \(loss, aux\); got a single array of shape \(\)'):
    accum_jax.value_and_grad(loss_fn, 2, has_aux=True)(PARAMS, _batch(4))
  with pytest.raises(TypeError, match=r'scalar loss, got shape \(2, 2\)'):
    accum_jax.value_and_grad(lambda p, b: b['x'][:2, :2] @ p['w'][:2], 2)(
        PARAMS, _batch(4))


def test_bad_inner_and_accumulator_dtype():
  with pytest.raises(TypeError, match='expects an optax.GradientTransformation'):
    accum_jax.accumulate(lambda g: g, 2)
  with pytest.raises(TypeError, match='accumulator_dtype must be a floating'):
    accum_jax.accumulate(optax.sgd(0.1), 2, accumulator_dtype=jnp.int32)
