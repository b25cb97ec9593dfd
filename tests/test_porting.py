"""What users hit porting real training code (MaxText, the Flax cookbook,
optax's wrappers): each case against the full-batch computation, or the
accum_jax error it now gets."""

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

K = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_eight_devices(code):
  """Runs ``code`` in a process with 8 CPU devices; it prints 'ok'."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]


def data(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
          'y': jnp.asarray(rng.normal(size=(n,)), jnp.float32)}


def maxtext_loss(model, config, data, dropout_rng, params, is_train=True):
  """MaxText's loss_fn signature: the params fifth, the batch third."""
  del model, dropout_rng
  pred = jnp.tanh(data['x'] @ params['w']) * config['scale']
  loss = jnp.mean((pred - data['y']) ** 2)
  return loss, {'is_train': jnp.asarray(is_train)}


PARAMS = {'w': jnp.asarray([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])[:, 0]}


def test_argnums_value_and_grad_takes_the_loss_own_signature():
  config = {'scale': 2.0}
  args = (None, config, data(), None, PARAMS)
  ref = jax.value_and_grad(maxtext_loss, argnums=4, has_aux=True)(*args)
  got = accum_jax.value_and_grad(maxtext_loss, K, argnums=4, batch_argnums=2,
                                 has_aux=True)(*args, is_train=False)
  np.testing.assert_allclose(got[0][0], ref[0][0], rtol=1e-6)
  np.testing.assert_allclose(got[1]['w'], ref[1]['w'], rtol=1e-6)
  assert not got[0][1]['is_train']  # keyword arguments pass through


def test_argnums_value_and_update_is_the_full_batch_step():
  config = {'scale': 2.0}
  tx = accum_jax.accumulate(optax.adam(1e-2), K)
  step = jax.jit(accum_jax.value_and_update(
      maxtext_loss, tx, argnums=4, batch_argnums=2, has_aux=True))
  (loss, _), updates, _ = step(PARAMS, tx.init(PARAMS), None, config, data(),
                               None)
  grads = jax.grad(lambda p: maxtext_loss(None, config, data(), None, p)[0])(
      PARAMS)
  ref, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(PARAMS))
  np.testing.assert_allclose(updates['w'], ref['w'], rtol=1e-6)
  np.testing.assert_allclose(
      loss, maxtext_loss(None, config, data(), None, PARAMS)[0], rtol=1e-6)


def test_argnums_errors():
  with pytest.raises(ValueError, match='name the batched arguments too'):
    accum_jax.value_and_grad(maxtext_loss, K, argnums=4)
  with pytest.raises(ValueError, match=r'includes argnums=4'):
    accum_jax.value_and_grad(maxtext_loss, K, argnums=4, batch_argnums=(2, 4))
  with pytest.raises(TypeError, match='one int'):
    accum_jax.value_and_grad(maxtext_loss, K, argnums=(0, 4))
  f = accum_jax.value_and_grad(maxtext_loss, K, argnums=4, batch_argnums=2)
  with pytest.raises(TypeError, match='argnums=4 but .* got 3 positional'):
    f(None, {'scale': 1.0}, data())


def lm_metrics(params, batch):
  """MaxText's metrics: the token-loss sum and the token count beside the
  mean loss (the metric logged as lm_loss is sum / count, over the step)."""
  err = (jnp.tanh(batch['x'] @ params['w']) - batch['y']) ** 2
  mask = batch['mask']
  total = jnp.sum(err * mask)
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), {'sum': total, 'count': count,
                                           'mean': total / count}


def masked_data():
  d = data(n=32)
  d['mask'] = jnp.asarray(np.random.default_rng(3).random(32) < 0.6,
                          jnp.float32)
  return d


@pytest.mark.parametrize('spec', ['sum', {'sum': 'sum', 'count': 'sum',
                                          'mean': 'mean'}])
def test_sums_in_aux_are_the_full_batch_sums(spec):
  batch = masked_data()
  f = accum_jax.value_and_grad(lm_metrics, K, has_aux=True,
                               weight_fn=lambda mb: jnp.sum(mb['mask']),
                               aux=spec)
  (loss, aux), _ = jax.jit(f)(PARAMS, batch)
  _, ref = lm_metrics(PARAMS, batch)
  np.testing.assert_allclose(aux['sum'], ref['sum'], rtol=1e-5)
  np.testing.assert_allclose(aux['count'], ref['count'], rtol=1e-6)
  np.testing.assert_allclose(aux['sum'] / aux['count'], loss, rtol=1e-5)
  if spec != 'sum':  # a token-weighted mean of the micro-batch means
    np.testing.assert_allclose(aux['mean'], ref['mean'], rtol=1e-5)


def test_the_default_mean_of_a_sum_is_not_the_sum():
  """What MaxText's lm_loss showed before (0.759 for 5.832): a sum
  averaged over micro-batches."""
  batch = masked_data()
  f = accum_jax.value_and_grad(lm_metrics, K, has_aux=True,
                               weight_fn=lambda mb: jnp.sum(mb['mask']))
  (_, aux), _ = f(PARAMS, batch)
  assert aux['sum'] < 0.5 * lm_metrics(PARAMS, batch)[1]['sum']


def test_aux_sum_in_value_and_update_and_bad_specs():
  batch = masked_data()
  tx = accum_jax.accumulate(optax.sgd(0.1), K)
  step = accum_jax.value_and_update(lm_metrics, tx, has_aux=True,
                                    aux={'sum': 'sum', 'count': 'sum',
                                         'mean': 'mean'})
  (_, aux), _, _ = step(PARAMS, tx.init(PARAMS), batch)
  np.testing.assert_allclose(aux['count'], jnp.sum(batch['mask']))
  with pytest.raises(ValueError, match="aux must be 'mean', 'sum'"):
    accum_jax.value_and_grad(lm_metrics, K, has_aux=True, aux='total')
  with pytest.raises(ValueError, match="holds 'mean' or 'sum' leaves"):
    accum_jax.value_and_grad(lm_metrics, K, has_aux=True, aux={'sum': 'max'})
  with pytest.raises(ValueError, match='Give one'), pytest.warns(
      DeprecationWarning, match='stack_aux= is deprecated'):
    accum_jax.value_and_grad(lm_metrics, K, has_aux=True, aux='sum',
                             stack_aux=True)
  f = accum_jax.value_and_grad(lm_metrics, K, has_aux=True,
                               aux={'other': 'sum'})
  with pytest.raises(ValueError, match='pytree prefix'):
    f(PARAMS, batch)


def test_aux_sum_on_a_mesh_of_eight():
  """Summed aux leaves are summed over the devices, not scaled by the unit
  weights' 1 / shards, with and without weight_fn."""
  code = textwrap.dedent("""
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      import accum_jax
      from accum_jax import _compat
      from tests.test_porting import lm_metrics, masked_data, PARAMS
      mesh = _compat.make_mesh((8,), ('data',))
      ref = lm_metrics(PARAMS, masked_data())[1]
      batch = jax.device_put(masked_data(), NamedSharding(mesh, P('data')))
      for wf in (None, lambda mb: jnp.sum(mb['mask'])):
        f = accum_jax.value_and_grad(lm_metrics, 2, has_aux=True,
                                     weight_fn=wf, aux={'sum': 'sum',
                                     'count': 'sum', 'mean': 'mean'})
        with _compat.set_mesh(mesh):
          (_, aux), _ = jax.jit(f)(PARAMS, batch)
        np.testing.assert_allclose(aux['sum'], ref['sum'], rtol=1e-5)
        np.testing.assert_allclose(aux['count'], ref['count'])
      print('ok')
  """)
  on_eight_devices(code)


def sq_loss(params, batch):
  return jnp.mean((jnp.tanh(batch['x'] @ params['w']) - batch['y']) ** 2)


def test_a_function_cross_step_is_refused_and_in_step_is_the_full_batch():
  """sophia evaluates obj_fn at the window's end: cross-step that would be
  the last micro-batch's; in-step it is the whole batch's."""
  batch = data()
  sophia = optax.contrib.sophia(1e-2, update_interval=1)
  tx = accum_jax.accumulate(sophia, K)
  state = tx.init(PARAMS)
  grads = jax.grad(sq_loss)(PARAMS, batch)
  with pytest.raises(TypeError, match=r"function in its extra arguments "
                     r"\['obj_fn'\].*inner_extra_args"):
    tx.update(grads, state, PARAMS, obj_fn=lambda p: sq_loss(p, batch))
  lbfgs = accum_jax.accumulate(optax.lbfgs(), K)
  with pytest.raises(TypeError, match=r"\['value_fn'\]"):
    lbfgs.update(grads, lbfgs.init(PARAMS), PARAMS, value=1.0, grad=grads,
                 value_fn=lambda p: sq_loss(p, batch))
  objective = lambda p: sq_loss(p, batch)  # noqa: E731
  _, updates, _ = accum_jax.value_and_update(sq_loss, tx)(
      PARAMS, state, batch, inner_extra_args={'obj_fn': objective})
  ref, _ = sophia.update(grads, sophia.init(PARAMS), PARAMS, obj_fn=objective)
  np.testing.assert_allclose(updates['w'], ref['w'], rtol=1e-5, atol=1e-7)


def lookahead():
  return optax.lookahead(optax.adam(1e-2), sync_period=2, slow_step_size=0.5)


def test_lookahead_in_step_and_cross_step_are_the_full_batch_steps():
  """optax.lookahead's params are LookaheadParams(fast, slow); the loss is
  differentiated for the fast ones, as optax's own example does."""
  batch = data()
  params = optax.LookaheadParams.init_synced(PARAMS)
  ref_state = lookahead().init(params)
  ref_params = params
  tx = accum_jax.accumulate(lookahead(), K)
  step = jax.jit(accum_jax.value_and_update(sq_loss, tx))
  state, cross_state = tx.init(params), tx.init(params)
  cross_params = params
  for i in range(3):
    b = data(i)
    grads = jax.grad(sq_loss)(ref_params.fast, b)
    updates, ref_state = lookahead().update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    _, updates, state = step(params, state, b)
    params = optax.apply_updates(params, updates)
    for j in range(K):
      mb = jax.tree.map(lambda x, j=j: x[j::K], b)
      g = jax.grad(sq_loss)(cross_params.fast, mb)
      updates, cross_state = tx.update(g, cross_state, cross_params)
      cross_params = optax.apply_updates(cross_params, updates)
  for got in (params, cross_params):
    np.testing.assert_allclose(got.fast['w'], ref_params.fast['w'],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.slow['w'], ref_params.slow['w'],
                               rtol=1e-5, atol=1e-7)
  del batch


def nnx_setup():
  nnx = pytest.importorskip('flax.nnx')
  if not hasattr(nnx, 'as_pure'):
    pytest.skip('nnx_train_step needs flax >= 0.12.7')
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.1), K),
                            wrt=nnx.Param)
  return nnx, model, optimizer


def cookbook_loss(model, x, y):
  """The Flax cookbook's loss: the batch as two arguments."""
  return jnp.mean((model(x)[:, 0] - y) ** 2)


def test_nnx_several_batched_arguments_are_the_full_batch_step():
  d = data()
  for order in ((1, 2), (2, 1)):
    nnx, model, optimizer = nnx_setup()
    kernel, bias = model.kernel[...], model.bias[...]

    def full(kernel):
      return cookbook_loss(lambda x, kernel=kernel: x @ kernel + bias,
                           d['x'], d['y'])

    ref_loss, grad = jax.value_and_grad(full)(kernel)
    # The loss takes x and y in the order batch_argnum puts them.
    loss_fn = cookbook_loss if order == (1, 2) else (
        lambda model, y, x: cookbook_loss(model, x, y))
    loss = nnx.jit(lambda m, o, b, f=loss_fn, order=order:
                   accum_jax.nnx_train_step(m, o, b, f, batch_argnums=order))(
                       model, optimizer, (d['x'], d['y']))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(model.kernel[...], kernel - 0.1 * grad,
                               rtol=1e-6)


def test_an_unsplit_batch_sized_argument_is_named():
  nnx, model, optimizer = nnx_setup()
  d = data()
  with pytest.raises(ValueError, match=r'positional argument 0 after the '
                     r'batch \(leading size 16\).*micro-batch of 4 rows'):
    accum_jax.nnx_train_step(model, optimizer, d['x'], cookbook_loss, d['y'])
  f = accum_jax.value_and_grad(lambda p, x, y: cookbook_loss(
      lambda x: x[:, None] @ p[None], x, y), K)
  with pytest.raises(ValueError, match=r"keyword argument 'y' \(leading "
                     r'size 16\).*batch_argnums='):
    f(jnp.ones(3), d['x'], y=d['y'])
  with pytest.raises(ValueError, match='pass the batch as a tuple of that '
                     'many'):
    accum_jax.nnx_train_step(model, optimizer, d['x'], cookbook_loss,
                             batch_argnums=(1, 2))


def dropout_loss(key):
  def loss(params, batch):
    keep = jax.random.bernoulli(key, 0.5, batch['x'].shape)
    pred = jnp.tanh(jnp.where(keep, batch['x'], 0.0) @ params['w'])
    return jnp.mean((pred - batch['y']) ** 2)
  return loss


@pytest.mark.parametrize('key', [jax.random.key(0), jax.random.PRNGKey(0)])
def test_a_key_held_in_a_closure_is_named(key):
  f = accum_jax.value_and_grad(dropout_loss(key), K)
  with pytest.warns(UserWarning, match='same in every micro-batch'):
    jax.jit(f)(PARAMS, data())


def test_keys_that_change_per_microbatch_raise_no_warning():
  def loss(params, batch, rng):
    return dropout_loss(rng)(params, batch)
  f = accum_jax.value_and_grad(loss, K)
  for rng in (jax.random.key(0), jax.random.PRNGKey(0)):
    jax.jit(lambda p, b, r: f(p, b, rng=r))(PARAMS, data(), rng)  # folded
  jax.jit(f)(PARAMS, data(), jax.random.key(1))  # a new-style key: folded
  # A key in a scan over layers, folded with the index, is fine too.
  def layers(params, batch, rng):
    def body(h, i):
      k = jax.random.fold_in(rng, i)
      return jnp.where(jax.random.bernoulli(k, 0.9, h.shape), h, 0.0), None
    h, _ = jax.lax.scan(body, batch['x'], jnp.arange(3))
    return jnp.mean((jnp.tanh(h @ params['w']) - batch['y']) ** 2)
  accum_jax.value_and_grad(layers, K)(PARAMS, data(), rng=jax.random.key(2))


def test_an_nnx_rngs_in_a_closure_is_named():
  nnx, model, optimizer = nnx_setup()
  rngs = nnx.Rngs(dropout=0)
  drop = nnx.Dropout(0.5)

  def loss(model, x, y):
    return cookbook_loss(lambda x: model(drop(x, rngs=rngs)), x, y)

  d = data()
  with pytest.raises(ValueError, match='closes over an NNX object'):
    accum_jax.nnx_train_step(model, optimizer, (d['x'], d['y']), loss,
                             batch_argnums=(1, 2))


def test_a_two_dimensional_explicit_mesh_matches_the_full_batch():
  """MaxText's layout: the batch over 'data', the weights' columns over
  'model' (Explicit axes). The loop runs per 'data' shard with its carry
  sharded over 'model' like the gradient (it failed before: the carry's
  zeros were unsharded)."""
  code = textwrap.dedent("""
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import NamedSharding, PartitionSpec as P
      import accum_jax
      from accum_jax import _compat
      mesh = _compat.make_mesh((4, 2), ('data', 'model'))
      rng = np.random.default_rng(0)
      params = [jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32)
                for _ in range(3)]
      batch = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
      def loss_fn(params, x):
        for w in params:
          x = jnp.tanh(x @ w)
        return jnp.mean(x ** 2)
      ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, batch)
      ps = jax.device_put(params, NamedSharding(mesh, P(None, 'model')))
      xs = jax.device_put(batch, NamedSharding(mesh, P('data')))
      tx = accum_jax.accumulate(optax.sgd(0.1), 4, cross_step=False)
      with _compat.set_mesh(mesh):
        loss, grads = jax.jit(accum_jax.value_and_grad(loss_fn, 4))(ps, xs)
        _, updates, _ = jax.jit(accum_jax.value_and_update(loss_fn, tx))(
            ps, tx.init(ps), xs)
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
      for g, u, r in zip(grads, updates, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(u, -0.1 * r, rtol=1e-5, atol=1e-8)
        # jax 0.7.0 returns the gradient replicated (same numbers); 0.10.2
        # keeps the params' sharding.
        if tuple(int(v) for v in jax.__version__.split('.')[:2]) >= (0, 10):
          assert g.sharding.spec == P(None, 'model'), g.sharding
      print('ok')
  """)
  on_eight_devices(code)


# optax's own lookahead test, ported: its analytic setting (constant
# gradients 2 and -2, a fast optimizer stepping by 0.5 per unit gradient,
# sync every 3 steps, slow step 1/3), with every optimizer step a window of
# K micro-batches, cross-step and in-step.
LOOKAHEAD_GRADS = {'x': jnp.asarray(2.0), 'y': jnp.asarray(-2.0)}


def linear_loss(params, batch):
  return 2.0 * params['x'] - 2.0 * params['y'] + 0.0 * jnp.sum(batch)


@pytest.mark.parametrize('sync_period, slow_step_size, steps, want', [
    (3, 1 / 3, 6, {'x': 1.0, 'y': -1.0}),
    (1, 0.5, 2, {'x': 1.0, 'y': -1.0}),
    (1, 0.0, 2, {'x': 3.0, 'y': -3.0}),
    (1, 1.0, 2, {'x': -1.0, 'y': 1.0}),
    (2, 1.0, 2, {'x': -1.0, 'y': 1.0})])
def test_optax_lookahead_analytic_windows(sync_period, slow_step_size, steps,
                                          want):
  fast_step = 0.5 if sync_period == 3 else 1.0
  opt = optax.lookahead(optax.sgd(fast_step), sync_period, slow_step_size)
  tx = accum_jax.accumulate(opt, K)
  start = optax.LookaheadParams.init_synced({'x': jnp.asarray(3.0),
                                             'y': jnp.asarray(-3.0)})
  params, state = start, tx.init(start)
  for _ in range(steps * K):
    updates, state = tx.update(LOOKAHEAD_GRADS, state, params)
    params = optax.apply_updates(params, updates)
  in_step = accum_jax.value_and_update(linear_loss, tx)
  p, s = start, tx.init(start)
  for _ in range(steps):
    _, updates, s = jax.jit(in_step)(p, s, jnp.zeros((K, 1)))
    p = optax.apply_updates(p, updates)
  for got in (params.slow, p.slow):
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-6)
