"""One option surface: ``LoopOptions`` taken the same way by every driver and
helper, the older spellings as warning aliases, the helpers' options kept
apart from the loss's keywords, and the shape of the core (frames, imports).

Every numeric check is against the full-batch computation.
"""

import ast
import dataclasses
import inspect
import pathlib
import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import accum_jax
from tests._helpers import assert_trees_close

K = 4
PACKAGE = pathlib.Path(accum_jax.__file__).parent


def close(a, b):
  assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


def _data(b=16, d=3, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (b, d)), jax.random.normal(ky, (b,)))


W = jnp.array([0.5, -0.25, 1.0])


def mse(w, x, y):
  err = x @ w - y
  return jnp.mean(err ** 2), {'sq': jnp.sum(err ** 2), 'max': jnp.max(err)}


def test_options_record_equals_keywords_and_the_full_batch():
  x, y = _data()
  opts = accum_jax.LoopOptions(has_aux=True, batch_argnums=(1, 2),
                               aux={'sq': 'sum', 'max': 'mean'}, remat=True)
  (v1, a1), g1 = accum_jax.value_and_grad(mse, K, options=opts)(W, x, y)
  (v2, a2), g2 = accum_jax.value_and_grad(
      mse, K, has_aux=True, batch_argnums=(1, 2),
      aux={'sq': 'sum', 'max': 'mean'}, remat=True)(W, x, y)
  (ref, ref_aux), ref_g = jax.value_and_grad(mse, has_aux=True)(W, x, y)
  close((v1, g1, a1['sq']), (ref, ref_g, ref_aux['sq']))
  close((v1, g1, a1), (v2, g2, a2))


def test_a_keyword_replaces_the_records_field():
  x, y = _data()
  opts = accum_jax.LoopOptions(has_aux=True, batch_argnums=(1, 2))
  (_, stacked), _ = accum_jax.value_and_grad(mse, K, options=opts,
                                             aux='stack')(W, x, y)
  assert stacked['sq'].shape == (K,)
  assert opts.aux == 'mean'  # the record itself is unchanged (frozen)
  with pytest.raises(dataclasses.FrozenInstanceError):
    opts.aux = 'sum'


def test_unknown_keyword_lists_the_options():
  with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) "
                     r"\['stacked_aux'\].*LoopOptions"):
    accum_jax.value_and_grad(mse, K, stacked_aux=True)
  with pytest.raises(TypeError, match='must be an accum_jax.LoopOptions'):
    accum_jax.value_and_grad(mse, K, options={'has_aux': True})
  with pytest.raises(ValueError, match="aux must be 'mean', 'sum'"):
    accum_jax.LoopOptions(aux='max')
  with pytest.raises(ValueError, match='unroll must be >= 1'):
    accum_jax.LoopOptions(unroll=0)


def test_the_older_aux_flags_warn_and_match_aux():
  x, y = _data()
  f = accum_jax.value_and_grad(mse, K, has_aux=True, batch_argnums=(1, 2),
                               aux='stack')
  with pytest.warns(DeprecationWarning, match="stack_aux= is deprecated; use "
                    "aux='stack'"):
    g = accum_jax.value_and_grad(mse, K, has_aux=True, batch_argnums=(1, 2),
                                 stack_aux=True)
  close(f(W, x, y), g(W, x, y))

  def rows(w, x, y):
    err = x @ w - y
    return jnp.mean(err ** 2), err

  with pytest.warns(DeprecationWarning, match='concat_aux= is deprecated'):
    (_, per_row), _ = accum_jax.value_and_grad(
        rows, K, has_aux=True, batch_argnums=(1, 2), concat_aux=True)(W, x, y)
  close(per_row, x @ W - y)


# The Equinox helpers: every option, the one spelling of the batched args.

class Linear(eqx.Module):
  w: jax.Array
  act: object = eqx.field(static=True)

  def __call__(self, x):
    return self.act(x @ self.w)


MODEL = Linear(W, jnp.tanh)


def eqx_loss(model, x, y):
  err = model(x) - y
  return jnp.mean(err ** 2), {'sq': jnp.sum(err ** 2), 'rows': err}


def test_equinox_takes_every_option():
  x, y = _data()
  (ref, ref_aux), ref_g = eqx.filter_value_and_grad(eqx_loss, has_aux=True)(
      MODEL, x, y)
  # aux as a prefix (a sum and per-row values), unrolled, remat.
  f = accum_jax.filter_value_and_grad(
      lambda m, x, y: (eqx_loss(m, x, y)[0], eqx_loss(m, x, y)[1]['sq']),
      K, has_aux=True, aux='sum', unroll=2, remat=True)
  (v, sq), g = f(MODEL, x, y)
  close((v, sq, g.w), (ref, ref_aux['sq'], ref_g.w))
  (_, aux), _ = accum_jax.filter_value_and_grad(
      lambda m, x, y: (eqx_loss(m, x, y)[0], eqx_loss(m, x, y)[1]['rows']),
      K, has_aux=True, aux='concat')(MODEL, x, y)
  close(aux, ref_aux['rows'])
  # A per-example transform, against clipping each example's gradient.
  clip = lambda g: jax.tree.map(lambda t: t / jnp.maximum(  # noqa: E731
      1.0, optax.tree.norm(g)), g)
  _, g = accum_jax.filter_value_and_grad(
      lambda m, x, y: eqx_loss(m, x, y)[0], K, per_example_fn=clip)(
          MODEL, x, y)
  per_ex = jax.vmap(lambda xi, yi: eqx.filter_grad(
      lambda m: eqx_loss(m, xi[None], yi[None])[0])(MODEL))(x, y)
  close(g.w, jnp.mean(jax.vmap(clip)(per_ex.w), 0))
  # Sequence-first data (T, B, d), split along axis 1; the target c is
  # not batched.
  xt = jnp.stack([x, 2 * x])

  def seq_loss(model, xt, c):
    return jnp.mean((model(xt.sum(0)) - c) ** 2)

  c = jnp.float32(0.3)
  v, g = accum_jax.filter_value_and_grad(seq_loss, K, in_axes=1,
                                         batch_argnums=1)(MODEL, xt, c)
  ref_v, ref_g = eqx.filter_value_and_grad(seq_loss)(MODEL, xt, c)
  close((v, g.w), (ref_v, ref_g.w))


def test_equinox_update_takes_options_and_matches_the_full_batch():
  x, y = _data()
  tx = accum_jax.accumulate(optax.adam(0.1), K)
  opts = accum_jax.LoopOptions(has_aux=True, aux='sum')

  def loss(model, x, y):
    v, aux = eqx_loss(model, x, y)
    return v, aux['sq']

  state = tx.init(eqx.filter(MODEL, eqx.is_inexact_array))
  (v, sq), updates, _ = eqx.filter_jit(
      accum_jax.filter_value_and_update(loss, tx, options=opts))(
          MODEL, state, x, y)
  (ref_v, ref_sq), ref_g = eqx.filter_value_and_grad(loss, has_aux=True)(
      MODEL, x, y)
  inner = optax.adam(0.1)
  ref_updates, _ = inner.update(ref_g, inner.init(ref_g))
  close((v, sq, updates.w), (ref_v, ref_sq, ref_updates.w))


def test_equinox_argnums_is_a_warning_alias_of_batch_argnums():
  x, y = _data()
  scale = jnp.float32(2.0)

  def loss(model, scale, x, y):
    return scale * eqx_loss(model, x, y)[0]

  want = accum_jax.filter_value_and_grad(loss, K, batch_argnums=(2, 3))(
      MODEL, scale, x, y)
  with pytest.warns(DeprecationWarning, match='argnums= is deprecated; use '
                    'batch_argnums='):
    f = accum_jax.filter_value_and_grad(loss, K, argnums=(2, 3))
  close(f(MODEL, scale, x, y), want)
  close(want[1].w, eqx.filter_grad(loss)(MODEL, scale, x, y).w)
  with pytest.raises(TypeError, match='name the same option'):
    accum_jax.filter_value_and_grad(loss, K, argnums=2, batch_argnums=2)
  with pytest.raises(TypeError, match='does not take batch_argnames='):
    accum_jax.filter_value_and_grad(loss, K, batch_argnames='x')
  with pytest.raises(TypeError, match='in_axes must be an int'):
    accum_jax.filter_value_and_grad(loss, K, in_axes=(0, 1))


# NNX: its options apart from the loss's keywords.

def _nnx():
  if not hasattr(nnx, 'as_pure'):
    pytest.skip('nnx_train_step needs flax >= 0.12.7')
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, accum_jax.accumulate(optax.sgd(0.1), K),
                            wrt=nnx.Param)
  return model, optimizer


def _nnx_expected(loss_fn, batch, **kw):
  model, _ = _nnx()
  grads = nnx.grad(lambda m: loss_fn(m, batch, **kw))(model)
  return model.kernel[...] - 0.1 * grads['kernel'][...]


def test_nnx_loss_keyword_named_like_an_option_reaches_the_loss():
  x, y = _data()
  batch = {'x': x, 'y': y[:, None]}
  seen = []

  def loss_fn(model, mb, remat=False, has_aux=False):
    seen.append((remat, has_aux))
    scale = 2.0 if remat else 1.0
    return scale * jnp.mean((model(mb['x']) - mb['y']) ** 2)

  model, optimizer = _nnx()
  accum_jax.nnx_train_step(model, optimizer, batch, loss_fn,
                           options=accum_jax.LoopOptions(), remat=True,
                           has_aux=True)
  assert set(seen) == {(True, True)}
  close(model.kernel[...], _nnx_expected(loss_fn, batch, remat=True))
  # Without options=, a keyword naming both an option and a loss parameter
  # is refused, not swallowed.
  model, optimizer = _nnx()
  with pytest.raises(TypeError, match=r'remat= names a loop option and a '
                     r'parameter of loss_fn.*options=accum_jax.LoopOptions'):
    accum_jax.nnx_train_step(model, optimizer, batch, loss_fn, remat=True)

  def counting_loss(model, mb, num_microbatches=1):
    return loss_fn(model, mb)

  with pytest.raises(TypeError, match="num_microbatches= is nnx_train_step's "
                     'own keyword'):
    accum_jax.nnx_train_step(model, optimizer, batch, counting_loss,
                             num_microbatches=K)


def test_nnx_options_as_keywords_still_work():
  x, y = _data()
  batch = {'x': x, 'y': y[:, None]}

  def loss_fn(model, mb):
    err = model(mb['x']) - mb['y']
    return jnp.mean(err ** 2), jnp.sum(err ** 2)

  model, optimizer = _nnx()
  loss, sq = accum_jax.nnx_train_step(model, optimizer, batch, loss_fn,
                                      has_aux=True, aux='sum', remat=True)
  ref, ref_sq = loss_fn(_nnx()[0], batch)
  close((loss, sq), (ref, ref_sq))
  close(model.kernel[...], _nnx_expected(lambda m, b: loss_fn(m, b)[0],
                                         batch))


def test_nnx_batch_argnum_is_a_warning_alias():
  x, y = _data()

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  model, optimizer = _nnx()
  with pytest.warns(DeprecationWarning, match='batch_argnum= is deprecated'):
    accum_jax.nnx_train_step(model, optimizer, (x, y[:, None]), loss_fn,
                             batch_argnum=(1, 2))
  close(model.kernel[...], _nnx_expected(
      lambda m, b: loss_fn(m, *b), (x, y[:, None])))


def test_linen_refuses_what_it_cannot_use():
  import flax.linen as nn
  from flax.training import train_state
  x, y = _data()
  module = nn.Dense(1)
  params = module.init(jax.random.key(0), x)['params']
  state = train_state.TrainState.create(
      apply_fn=module.apply, params=params,
      tx=accum_jax.accumulate(optax.sgd(0.1), K))

  def loss_fn(p, mb):
    return jnp.mean((module.apply({'params': p}, mb['x'])[:, 0] - mb['y'])
                    ** 2)

  batch = {'x': x, 'y': y}
  with pytest.raises(TypeError, match='does not take batch_argnums='):
    accum_jax.linen_train_step(state, batch, loss_fn, batch_argnums=2)
  new, loss = accum_jax.linen_train_step(
      state, batch, loss_fn, options=accum_jax.LoopOptions(remat=True))
  ref_g = jax.grad(loss_fn)(params, batch)
  close(new.params['kernel'], params['kernel'] - 0.1 * ref_g['kernel'])
  close(loss, loss_fn(params, batch))


def test_every_option_is_taken_by_every_helper():
  """A new LoopOptions field reaches every driver and helper by itself."""
  fields = {f.name for f in dataclasses.fields(accum_jax.LoopOptions)}
  for fn in (accum_jax.value_and_grad, accum_jax.value_and_update,
             accum_jax.linen_train_step, accum_jax.nnx_train_step,
             accum_jax.filter_value_and_grad,
             accum_jax.filter_value_and_update):
    params = inspect.signature(fn).parameters
    assert 'options' in params, fn.__name__
    assert any(p.kind is p.VAR_KEYWORD for p in params.values()), fn.__name__
    # No option is a parameter of its own, to drift from the record.
    assert not fields & set(params), (fn.__name__, fields & set(params))


# The shape of the core.

def _library_frames():
  return [f.name for f in traceback.extract_stack()
          if pathlib.Path(f.filename).parent == PACKAGE]


def test_at_most_five_library_frames_to_the_loss():
  x, y = _data()
  deepest = {}

  def loss(w, x, y):
    frames = _library_frames()
    if len(frames) > len(deepest.get('frames', [])):
      deepest['frames'] = frames
    return mse(w, x, y)[0]

  tx = accum_jax.accumulate(optax.sgd(0.1), K)
  for options in ({}, {'weight_fn': lambda x, y: 1.0 + 0 * x[0, 0]},
                  {'remat': True}):
    deepest.clear()
    jax.jit(accum_jax.value_and_update(loss, tx, batch_argnums=(1, 2),
                                       **options))(W, tx.init(W), x, y)
    assert len(deepest['frames']) <= 5, deepest['frames']
    deepest.clear()
    jax.jit(accum_jax.value_and_grad(loss, K, batch_argnums=(1, 2),
                                     **options))(W, x, y)
    assert len(deepest['frames']) <= 4, deepest['frames']


def _imports(path: pathlib.Path) -> set[str]:
  """The accum_jax modules a module imports (at any depth in its code)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'accum_jax':
        out |= {a.name for a in node.names}
      elif node.module.startswith('accum_jax.'):
        out.add(node.module.split('.')[1])
  return out


def test_no_import_circle():
  graph = {p.stem: _imports(p) - {p.stem} for p in PACKAGE.glob('_*.py')
           if p.stem != '__init__'}
  done, active = set(), []

  def visit(name):
    if name in active:
      raise AssertionError(f'import circle: {active[active.index(name):]}')
    if name in done or name not in graph:
      return
    active.append(name)
    for dep in sorted(graph[name]):
      visit(dep)
    active.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)
  # The circle this test was written for.
  assert '_accumulate' not in graph['_noise']


def test_loop_options_field_defaults_are_the_drivers_defaults():
  x, y = _data()
  plain = accum_jax.value_and_grad(lambda w, x, y: mse(w, x, y)[0], K,
                                   batch_argnums=(1, 2))(W, x, y)
  default = accum_jax.value_and_grad(
      lambda w, x, y: mse(w, x, y)[0], K,
      options=accum_jax.LoopOptions(batch_argnums=(1, 2)))(W, x, y)
  np.testing.assert_array_equal(plain[0], default[0])
  np.testing.assert_array_equal(plain[1], default[1])
