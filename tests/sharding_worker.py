"""Runs the mesh checks of one configuration on 8 CPU devices; prints JSON.

``python tests/sharding_worker.py {dp,fsdp,2d,auto}``. Spawned by
``tests/test_sharding.py`` (the device count must be set before jax starts,
so this never runs inside the pytest process). Every check records what
accum_jax computed on the mesh (``got``) next to an independent single-device
reference (``want``), and the collectives of the compiled step inside and
outside the micro-batch loop; the test file makes the assertions.
"""

import json
import os
import sys
import warnings

if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import accum_jax  # noqa: E402
from accum_jax import _casts, _compat, _loop, _scan, _sharding  # noqa: E402
from benchmarks import hlo as _hlo  # noqa: E402

B = 64
KS = (1, 2, 4, 8)


def make_params(seed=0):
  rng = np.random.RandomState(seed)
  return {'w1': jnp.asarray(rng.randn(16, 32) * 0.3, jnp.float32),
          'b1': jnp.asarray(rng.randn(32) * 0.1, jnp.float32),
          'w2': jnp.asarray(rng.randn(32, 8) * 0.3, jnp.float32)}


def make_batch(seed=1):
  rng = np.random.RandomState(seed)
  mask = np.ones(B, np.float32)
  mask[:B // 8] = 0.0  # the rows of one whole device (data axis of 8) ...
  mask[1::4] = 0.0  # ... and micro-batch 1 of k=4 are padding
  return {'x': jnp.asarray(rng.randn(B, 16), jnp.float32),
          'y': jnp.asarray(rng.randn(B, 8), jnp.float32),
          'mask': jnp.asarray(mask)}


def per_row(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - batch['y']) ** 2, axis=-1)


def loss_fn(params, batch):
  return jnp.mean(per_row(params, batch))


def token_loss(params, batch):
  """The mean over the real rows of a (micro-)batch; 0 if it has none."""
  m = batch['mask']
  return jnp.sum(m * per_row(params, batch)) / jnp.maximum(jnp.sum(m), 1.0)


def token_weight(batch):
  return jnp.sum(batch['mask'])


def token_reference(params, batch):
  m = batch['mask']
  return jnp.sum(m * per_row(params, batch)) / jnp.sum(m)


def aux_loss(params, batch):
  rows = per_row(params, batch)
  return jnp.mean(rows), {'max': jnp.max(rows), 'rows': jnp.int32(rows.size),
                          'big': jnp.any(rows > 3.0)}


def tolist(tree):
  return [np.asarray(x, np.float64).tolist() for x in jax.tree.leaves(tree)]


def naive_value_and_grad(loss, k):
  """A hand-written strided scan, as users write it (the baseline)."""

  def f(params, batch):
    split = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]), batch)

    def body(carry, j):
      mb = jax.tree.map(
          lambda x: jax.lax.dynamic_index_in_dim(x, j, 1, False), split)
      value, grads = jax.value_and_grad(loss)(params, mb)
      return jax.tree.map(jnp.add, carry, (value, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros([]), params))
    total, _ = jax.lax.scan(body, zeros, jnp.arange(k))
    return jax.tree.map(lambda t: t / k, total)

  return f


class Recorder:
  """Collects the checks of one configuration."""

  def __init__(self, mesh, data_axes):
    self.mesh = mesh
    self.data_axes = data_axes
    self.out = {}

  def compile(self, fn, *args, donate=()):
    """Compiles ``fn`` once; returns it and its collective counts."""
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, {
        'all': _hlo.count_collectives(compiled),
        'data': _hlo.count_collectives(compiled, self.mesh, self.data_axes)}

  def counts(self, fn, *args):
    return self.compile(fn, *args)[1]

  def run(self, fn, *args):
    compiled, counts = self.compile(fn, *args)
    return compiled(*args), counts

  def record(self, name, got, want, counts=None, **extra):
    self.out[name] = {'got': tolist(got), 'want': tolist(want),
                      'counts': counts, **extra}


def cross_step_checks(rec, mesh, pspecs, prefix, k=4):
  """Cross-step tx.update on sharded params: k micro-batch calls, donated,
  vs one full-batch adam step; the state keeps the params' shardings."""
  params, batch = make_params(), make_batch()
  inner = optax.adam(1e-2)
  grads = jax.grad(loss_fn)(params, batch)
  updates, _ = inner.update(grads, inner.init(params), params)
  want = optax.apply_updates(params, updates)
  tx = accum_jax.accumulate(inner, k)

  def gathered_loss(p, mb):  # FSDP by hand: gather, then the loss
    return loss_fn(jax.tree.map(lambda x: jax.sharding.reshard(x, P()), p),
                   mb)

  def step(p, s, mb):
    updates, s = tx.update(jax.grad(gathered_loss)(p, mb), s, p)
    return optax.apply_updates(p, updates), s

  with _compat.set_mesh(mesh):
    ps = put(mesh, make_params(), pspecs)
    state = jax.jit(tx.init)(ps)
    jstep = jax.jit(step, donate_argnums=(0, 1))
    for j in range(k):
      mb = put(mesh, jax.tree.map(lambda x, j=j: x[j::k], batch),
               jax.tree.map(lambda _: P(rec.data_axes), batch))
      ps, state = jstep(ps, state, mb)
  rec.record(f'{prefix}/cross_step', ps, want, param_specs=specs_of(ps),
             acc_specs=specs_of(state.acc))


def put(mesh, tree, specs):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, specs)


def spec_str(spec):
  """``P('data', None)``: as jax 0.10 prints a spec (0.7.0 wrote
  ``PartitionSpec('data', None)``)."""
  return 'P' + repr(tuple(spec))


def specs_of(tree):
  return [spec_str(x.sharding.spec) for x in jax.tree.leaves(tree)]


def grad_checks(rec, mesh, pspecs, prefix, ks=KS, **options):
  """value_and_grad (plain and token-weighted) for every k, vs full batch."""
  params, batch = make_params(), make_batch()
  want = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
  want_tok = jax.jit(jax.value_and_grad(token_reference))(params, batch)
  with _compat.set_mesh(mesh):
    ps = put(mesh, params, pspecs)
    bs = put(mesh, batch, jax.tree.map(lambda _: P(rec.data_axes), batch))
    for k in ks:
      f = accum_jax.value_and_grad(loss_fn, k, **options)
      got, counts = rec.run(f, ps, bs)
      rec.record(f'{prefix}/grad/k{k}', got, want, counts,
                 grad_specs=specs_of(got[1]), param_specs=specs_of(ps))
      f = accum_jax.value_and_grad(token_loss, k, weight_fn=token_weight,
                                   **options)
      rec.record(f'{prefix}/token/k{k}', jax.jit(f)(ps, bs), want_tok)


def part_full_checks(rec, mesh, pspecs, prefix, k=4, rows=None, **options):
  """A window left part-full by one cross-step update joins the step (its
  sum seeds the loop's carry on a mesh): unit weights, where a micro-batch
  weighs 1 against the update's 1, and token weights against weight=5."""
  params, batch = make_params(), make_batch()
  if rows is not None:
    batch = jax.tree.map(lambda x: x[:rows], batch)
  g0 = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  full = jax.grad(loss_fn)(params, batch)
  tokens = jnp.sum(batch['mask'])
  tok = jax.grad(token_reference)(params, batch)
  cases = (
      ('unit', loss_fn, {}, {},
       jax.tree.map(lambda a, g: -(a + k * g) / (1 + k), g0, full)),
      ('token', token_loss, {'weight_fn': token_weight}, {'weight': 5.0},
       jax.tree.map(lambda a, g: -(5 * a + tokens * g) / (5 + tokens), g0,
                    tok)),
  )
  for name, loss, weighting, weight, want in cases:
    tx = accum_jax.accumulate(optax.sgd(1.0), k)
    with _compat.set_mesh(mesh):
      ps = put(mesh, make_params(), pspecs)
      bs = put(mesh, batch, jax.tree.map(lambda _: P(rec.data_axes), batch))
      gs = put(mesh, g0, pspecs)
      _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **weight))(
          gs, jax.jit(tx.init)(ps), ps)
      _, updates, state = jax.jit(accum_jax.value_and_update(
          loss, tx, **weighting, **options), donate_argnums=(1,))(
              ps, state, bs)
    rec.record(f'{prefix}/part_full_{name}', updates, want,
               acc_specs=specs_of(state.acc))


def bf16_loss(params, batch):
  """bfloat16 compute: w1 and w2 are only cast (gathered cast under FSDP);
  b1 is also read in float32 (gathered in float32)."""
  bf16 = jnp.bfloat16
  h = jnp.tanh(batch['x'].astype(bf16) @ params['w1'].astype(bf16)
               + params['b1'].astype(bf16))
  out = (h @ params['w2'].astype(bf16)).astype(jnp.float32)
  return (jnp.mean((out - batch['y']) ** 2)
          + 1e-3 * jnp.sum(params['b1'] ** 2))


def linen_bf16():
  """A Flax linen MLP computing in bfloat16 over float32 parameters, as
  users write it (``dtype=``): its loss, parameters and FSDP specs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = jnp.tanh(nn.Dense(32, dtype=jnp.bfloat16)(x))
      return nn.Dense(8, dtype=jnp.bfloat16)(x).astype(jnp.float32)

  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((2, 16)))['params']

  def loss(p, batch):
    return jnp.mean((model.apply({'params': p}, batch['x']) - batch['y']) ** 2)

  specs = {'Dense_0': {'kernel': P(None, 'data'), 'bias': P('data')},
           'Dense_1': {'kernel': P('data'), 'bias': P('data')}}
  return loss, params, specs


def cast_checks(rec, mesh, name, loss, params, pspecs, k=4):
  """FSDP per micro-batch with a loss that casts its parameters: those it
  only casts are all-gathered in bfloat16, with the same numbers as
  gathering float32 and casting (the detection turned off: ``want``), and
  near the full batch (``full_batch``: bfloat16 compute, so to its
  rounding)."""
  batch = make_batch()
  want = jax.jit(jax.value_and_grad(loss))(params, batch)

  def make():
    return accum_jax.value_and_grad(loss, k, fsdp_reduce='per_microbatch')

  def emitted(f, op):  # before XLA:CPU widens bfloat16 collectives to f32
    hlo = jax.jit(f).lower(ps, bs).compiler_ir('hlo').as_hlo_text()
    return _hlo.collective_dtypes(hlo, op)

  with _compat.set_mesh(mesh):
    ps = put(mesh, params, pspecs)
    bs = put(mesh, batch, jax.tree.map(lambda _: P(rec.data_axes), batch))
    f = make()
    got, counts = rec.run(f, ps, bs)
    gathers = emitted(f, 'all-gather')
    scatters = emitted(f, 'reduce-scatter')
    detect = _casts.cast_dtypes
    _casts.cast_dtypes = lambda fn, params, *a, **kw: [None] * len(
        jax.tree.leaves(params))
    try:
      f = make()  # traced anew
      gathered_f32 = jax.jit(f)(ps, bs)
      f32_gathers = emitted(f, 'all-gather')
    finally:
      _casts.cast_dtypes = detect
  rec.record(f'fsdp_cast/{name}/k{k}', got, gathered_f32, counts,
             full_batch=tolist(want), gathers=gathers,
             f32_gathers=f32_gathers, scatters=scatters,
             grad_specs=specs_of(got[1]))


def update_checks(rec, mesh, pspecs, prefix, ks=KS, **options):
  """Three value_and_update steps of adam, vs three full-batch adam steps."""
  params, batch = make_params(), make_batch()
  for k in ks:
    tx = accum_jax.accumulate(optax.adam(1e-2), k)
    inner = optax.adam(1e-2)
    ref_p, ref_s = params, inner.init(params)
    for _ in range(3):
      grads = jax.grad(loss_fn)(ref_p, batch)
      updates, ref_s = inner.update(grads, ref_s, ref_p)
      ref_p = optax.apply_updates(ref_p, updates)

    def step(p, s, b, tx=tx):
      value, updates, s = accum_jax.value_and_update(loss_fn, tx,
                                                     **options)(p, s, b)
      return optax.apply_updates(p, updates), s, value

    with _compat.set_mesh(mesh):
      # Fresh copies: the step donates them.
      ps = put(mesh, make_params(), pspecs)
      bs = put(mesh, batch, jax.tree.map(lambda _: P(rec.data_axes), batch))
      state = jax.jit(tx.init)(ps)
      jstep, counts = rec.compile(step, ps, state, bs, donate=(0, 1))
      if AxisType.Auto in mesh.axis_types:
        # With an Auto model axis the state's sharding after the first step
        # is the partitioner's choice: let jit recompile for it.
        jstep = jax.jit(step, donate_argnums=(0, 1))
      for _ in range(3):
        ps, state, _ = jstep(ps, state, bs)
    rec.record(f'{prefix}/update/k{k}', ps, ref_p, counts,
               param_specs=specs_of(ps), acc_specs=specs_of(state.acc),
               want_specs=[spec_str(s) for s in jax.tree.leaves(
                   pspecs, is_leaf=lambda x: isinstance(x, P))])


def token_aux_loss(params, batch):
  m = batch['mask']
  value = token_loss(params, batch)
  return value, {'mean': value, 'tokens': jnp.sum(m).astype(jnp.int32),
                 'any': jnp.any(m > 0)}


def weighted_aux_checks(rec, mesh, pspecs, prefix, k=4, **options):
  """Token-weighted loss, reduced and stacked aux, vs by-hand references."""
  params, batch = make_params(), make_batch()
  m = batch['mask']
  per_j = []
  for j in range(k):
    b = jax.tree.map(lambda x, j=j: x[j::k], batch)
    per_j.append(jnp.sum(b['mask'] * per_row(params, b))
                 / jnp.maximum(jnp.sum(b['mask']), 1.0))
  want_value, want_grads = jax.value_and_grad(token_reference)(params, batch)
  with _compat.set_mesh(mesh):
    ps = put(mesh, params, pspecs)
    bs = put(mesh, batch, jax.tree.map(lambda _: P(rec.data_axes), batch))
    f = accum_jax.value_and_grad(token_aux_loss, k, has_aux=True,
                                 weight_fn=token_weight, **options)
    (value, aux), grads = jax.jit(f)(ps, bs)
    rec.record(f'{prefix}/token_aux',
               [value, grads, aux['mean'], aux['tokens'], aux['any']],
               [want_value, want_grads, want_value, jnp.sum(m), True])
    f = accum_jax.value_and_grad(token_aux_loss, k, has_aux=True,
                                 weight_fn=token_weight, aux='stack',
                                 **options)
    (value, aux), grads = jax.jit(f)(ps, bs)
    rec.record(f'{prefix}/token_stack_aux',
               [value, grads, aux['mean'], aux['tokens'], aux['any']],
               [want_value, want_grads, jnp.stack(per_j),
                jnp.stack([jnp.sum(m[j::k]) for j in range(k)]),
                jnp.stack([jnp.any(m[j::k] > 0) for j in range(k)])])
    # The weighted update path (its empty-window guard builds zeros that must
    # match the updates' sharding).
    tx = accum_jax.accumulate(optax.sgd(0.5), k)
    f = accum_jax.value_and_update(token_loss, tx, weight_fn=token_weight,
                                   **options)
    value, updates, _ = jax.jit(f)(ps, jax.jit(tx.init)(ps), bs)
    rec.record(f'{prefix}/token_update', [value, updates],
               [want_value, jax.tree.map(lambda g: -0.5 * g, want_grads)],
               update_specs=specs_of(updates), param_specs=specs_of(ps))


def dp_extra(rec, mesh):
  """Aux, RNG, an Auto mesh, a user shard_map, errors and the naive scan."""
  params, batch = make_params(), make_batch()
  k = 4
  data = P('data')
  with _compat.set_mesh(mesh):
    ps = put(mesh, params, jax.tree.map(lambda _: P(), params))
    bs = put(mesh, batch, jax.tree.map(lambda _: data, batch))

    # Reduced aux: mean of maxes over all k * 8 pieces, a row count, an any.
    (value, aux), _ = jax.jit(accum_jax.value_and_grad(
        aux_loss, k, has_aux=True))(ps, bs)
    rows = per_row(params, batch)
    pieces = rows.reshape(8, B // 8 // k, k)  # (device, local row, j)
    rec.record('dp/aux', [aux['max'], aux['rows'], aux['big']],
               [pieces.max(axis=1).mean(), B, jnp.any(rows > 3.0)])

    # Stacked aux: per micro-batch j, the mean over devices of their max.
    (_, stacked), _ = jax.jit(accum_jax.value_and_grad(
        aux_loss, k, has_aux=True, aux='stack'))(ps, bs)
    rec.record('dp/stack_aux', [stacked['max'], stacked['rows']],
               [pieces.max(axis=1).mean(axis=0), jnp.full(k, B // k)])

    # RNG: piece (device d, micro-batch j) draws from fold_in(fold_in(rng, d), j).
    def noisy(p, b, rng):
      noise = jax.random.normal(rng, b['y'].shape)
      return jnp.mean((b['x'] @ p['w1'] @ p['w2'] - b['y'] + noise) ** 2)

    rng = jax.random.key(7)
    got = jax.jit(accum_jax.value_and_grad(noisy, k))(ps, bs, rng=rng)
    local = jax.tree.map(lambda x: x.reshape(8, B // 8, *x.shape[1:]), batch)

    def piece_loss(p):
      total = 0.0
      for d in range(8):
        for j in range(k):
          b = jax.tree.map(lambda x, d=d, j=j: x[d, j::k], local)
          key = jax.random.fold_in(jax.random.fold_in(rng, d), j)
          total += noisy(p, b, key)
      return total / (8 * k)

    rec.record('dp/rng', got, jax.value_and_grad(piece_loss)(params))

    # A new-style key under any other name (Equinox's key=) is folded the
    # same way, per device and per micro-batch.
    def keyed(p, b, *, key):
      return noisy(p, b, key)

    got = jax.jit(accum_jax.value_and_grad(keyed, k))(ps, bs, key=rng)
    rec.record('dp/rng_as_key', got, jax.value_and_grad(piece_loss)(params))

    # A key in the threaded state, used as an nnx.Rngs stream uses it (the
    # key stays, the counter advances): piece (d, j) draws from
    # fold_in(fold_in(key, d), count + j); the key comes back unfolded.
    def stream_loss(p, b, state):
      key = jax.random.fold_in(state['key'], state['count'])
      return noisy(p, b, key), {'key': state['key'],
                                'count': state['count'] + 1}

    loop = _loop.LoopSpec(stream_loss, k, has_state=True)
    state0 = {'key': rng, 'count': jnp.int32(3)}

    @jax.jit
    def stream_step(p, b, state):
      inp = _loop.inputs(loop, p, b, (), {}, state)
      result = _scan.runner(loop, inp)(loop, inp, None)
      return result.mean_grads(), result.state

    grads, state = stream_step(ps, bs, state0)

    def stream_reference(p):
      total = 0.0
      for d in range(8):
        for j in range(k):
          b = jax.tree.map(lambda x, d=d, j=j: x[d, j::k], local)
          key = jax.random.fold_in(jax.random.fold_in(rng, d), 3 + j)
          total += noisy(p, b, key)
      return total / (8 * k)

    rec.record('dp/state_key', [grads, jax.random.key_data(state['key']),
                                state['count']],
               [jax.grad(stream_reference)(params),
                jax.random.key_data(rng), 3 + k])

  # A mesh with Auto axes: the batch sharding is not in the types, so the
  # batch axis is named; without it the plain scan runs (GSPMD decides).
  auto = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  want = jax.value_and_grad(loss_fn)(params, batch)
  with _compat.set_mesh(auto):
    ps = put(auto, params, jax.tree.map(lambda _: P(), params))
    bs = put(auto, batch, jax.tree.map(lambda _: data, batch))
    for name, opts in (('named', {'axis_name': 'data'}), ('unnamed', {})):
      got, counts = rec.run(accum_jax.value_and_grad(loss_fn, k, **opts), ps,
                            bs)
      rec.record(f'auto/{name}', got, want, counts)

  # Inside the user's own shard_map, with the batch axis named.
  def inner(p, b):
    return accum_jax.value_and_grad(loss_fn, k, axis_name='data')(p, b)

  with _compat.set_mesh(mesh):
    ps = put(mesh, params, jax.tree.map(lambda _: P(), params))
    bs = put(mesh, batch, jax.tree.map(lambda _: data, batch))
    f = jax.shard_map(inner, in_specs=(P(), data), out_specs=P())
    got, counts = rec.run(f, ps, bs)
    rec.record('dp/in_shard_map', got, want, counts)

    # The hand-written scan, to check the counter sees in-loop reductions.
    got, counts = rec.run(naive_value_and_grad(loss_fn, k), ps, bs)
    rec.record('dp/naive', got, want, counts)

    # A window left part-full by one cross-step update joins the step with
    # weight 1 against the k micro-batches (as on one device).
    tx = accum_jax.accumulate(optax.sgd(1.0), k)
    g0 = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    _, state = jax.jit(tx.update)(put(mesh, g0, jax.tree.map(
        lambda _: P(), params)), jax.jit(tx.init)(ps), ps)
    _, updates, _ = jax.jit(accum_jax.value_and_update(loss_fn, tx))(
        ps, state, bs)
    full = jax.grad(loss_fn)(params, batch)
    rec.record('dp/part_full_window', updates,
               jax.tree.map(lambda a, g: -(a + k * g) / (1 + k), g0, full))

    # A state threaded through the micro-batches (as the Flax helpers do for
    # BatchNorm statistics): each device threads its own, then they are
    # averaged, which for this running mean equals the one-device state.
    def stat_loss(p, b, state):
      return loss_fn(p, b), 0.9 * state + 0.1 * jnp.mean(b['x'], axis=0)

    def stat_step(p, s, b, c, tx=tx):
      loop = _scan.for_transform(tx, stat_loss, 'stat_step', has_state=True)
      return _scan.optimizer_step(loop, tx, _loop.inputs(loop, p, b, (), {}, c),
                                  s)

    _, updates, _, carried = jax.jit(stat_step)(
        ps, jax.jit(tx.init)(ps), bs, jnp.zeros(16))
    want_carry = jnp.zeros(16)
    for j in range(k):
      want_carry = 0.9 * want_carry + 0.1 * jnp.mean(batch['x'][j::k], axis=0)
    rec.record('dp/carry', [updates, carried],
               [jax.tree.map(lambda g: -g, full), want_carry])

    # The Flax Linen helper runs on the same path: 2 steps on the mesh equal
    # 2 full-batch adam steps on one device.
    import flax.linen as nn
    from flax.training import train_state

    model = nn.Dense(8)
    fparams = model.init(jax.random.key(1), jnp.ones((1, 16)))['params']

    def flax_loss(p, b):
      return jnp.mean((model.apply({'params': p}, b['x']) - b['y']) ** 2)

    ref = train_state.TrainState.create(apply_fn=model.apply, params=fparams,
                                        tx=optax.adam(1e-2))
    for _ in range(2):
      ref = ref.apply_gradients(grads=jax.grad(flax_loss)(ref.params, batch))
    fstate = train_state.TrainState.create(
        apply_fn=model.apply, params=put(mesh, fparams, jax.tree.map(
            lambda _: P(), fparams)),
        tx=accum_jax.accumulate(optax.adam(1e-2), k))
    fstep = jax.jit(lambda st, b: accum_jax.linen_train_step(st, b, flax_loss))
    for _ in range(2):
      fstate, _ = fstep(fstate, bs)
    rec.record('dp/linen', fstate.params, ref.params,
               rec.counts(lambda st, b: accum_jax.linen_train_step(
                   st, b, flax_loss), fstate, bs))

    # Ragged window: micro-batches 2 and 3 of 4 are padding.
    real = jax.tree.map(lambda x: x[(np.arange(B) % k) < 2], batch)
    got = jax.jit(accum_jax.value_and_grad(loss_fn, k))(
        ps, bs, num_real_microbatches=2)
    rec.record('dp/ragged', got, jax.value_and_grad(loss_fn)(params, real))

    # Non-finite policies: a NaN row on device 0; with 'skip_microbatch' the
    # share of micro-batch 1 on that device is dropped, with 'skip_step' the
    # whole step is skipped on every device.
    bad_batch = {**batch, 'x': batch['x'].at[1, 0].set(jnp.nan)}
    bad_bs = put(mesh, bad_batch, jax.tree.map(lambda _: data, batch))
    kept = np.ones(B, bool)
    kept[[r for r in range(B // 8) if r % k == 1]] = False  # that share
    for policy in ('skip_microbatch', 'skip_step'):
      tx = accum_jax.accumulate(optax.sgd(1.0), k, nonfinite=policy)
      f = accum_jax.value_and_update(loss_fn, tx)
      _, updates, state = jax.jit(f)(ps, jax.jit(tx.init)(ps), bad_bs)
      if policy == 'skip_step':
        want_updates = jax.tree.map(jnp.zeros_like, params)
      else:
        # Each of the other 8 * k - 1 shares keeps its weight of 1.
        shares = jax.tree.map(lambda x: x[kept], batch)
        want_updates = jax.tree.map(lambda g: -g, jax.grad(loss_fn)(
            params, shares))
      rec.record(f'dp/nonfinite_{policy}',
                 [updates, state.skipped_microbatches, state.skipped_steps],
                 [want_updates, 1, int(policy == 'skip_step')])

    # No mesh at all (one device): the plain path, unchanged.
    rec.record('dp/one_device', jax.jit(accum_jax.value_and_grad(
        loss_fn, k))(params, batch), want)

    fsdp_ps = put(mesh, params, jax.tree.map(lambda _: data, params))
    fsdp_state = accum_jax.accumulate(optax.sgd(1.0), 2,
                                      nonfinite='skip_step').init(fsdp_ps)
    errors = {}
    for name, fn in {
        'indivisible': lambda: accum_jax.value_and_grad(loss_fn, 16)(ps, bs),
        'bad_axis': lambda: accum_jax.value_and_grad(
            loss_fn, 2, axis_name='batch')(ps, bs),
        'bad_fsdp': lambda: accum_jax.value_and_grad(
            loss_fn, 2, fsdp_reduce='sometimes')(ps, bs),
        'fsdp_skip': lambda: accum_jax.value_and_update(
            loss_fn, accum_jax.accumulate(optax.sgd(1.0), 2,
                                          nonfinite='skip_step'))(
            fsdp_ps, fsdp_state, bs),
    }.items():
      try:
        jax.jit(fn)()
        errors[name] = None
      except (ValueError, TypeError) as e:
        errors[name] = f'{type(e).__name__}: {e}'
    mesh2 = _compat.make_mesh((4, 2), ('a', 'b'))
    with _compat.set_mesh(mesh2):
      mixed = put(mesh2, batch, {'x': P('a'), 'y': P('b'), 'mask': P('a')})
      try:
        jax.jit(accum_jax.value_and_grad(loss_fn, 2))(params, mixed)
        errors['mixed_axes'] = None
      except ValueError as e:
        errors['mixed_axes'] = f'{type(e).__name__}: {e}'
    rec.out['errors'] = errors


def auto_checks(rec, mesh):
  """A mesh with Auto axes, as ``Mesh(devices, names)`` makes it, and a batch
  placed with ``device_put``: named, unnamed (warned), silenced, eager."""
  grad_checks(rec, mesh, {'w1': P(), 'b1': P(), 'w2': P()}, 'auto',
              axis_name='data')
  update_checks(rec, mesh, {'w1': P(), 'b1': P(), 'w2': P()}, 'auto',
                axis_name='data')
  params, batch = make_params(), make_batch()
  want = jax.tree.map(lambda g: -g, jax.grad(loss_fn)(params, batch))
  with _compat.set_mesh(mesh):
    ps = put(mesh, params, jax.tree.map(lambda _: P(), params))
    bs = put(mesh, batch, jax.tree.map(lambda _: P('data'), batch))
    for k in KS:
      tx = accum_jax.accumulate(optax.sgd(1.0), k)
      state = jax.jit(tx.init)(ps)
      for name, opts in (('unnamed', {}), ('silenced', {'axis_name': ()})):
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter('always')
          (_, updates, _), counts = rec.run(
              accum_jax.value_and_update(loss_fn, tx, **opts), ps, state, bs)
        rec.record(f'auto/{name}_update/k{k}', updates, want, counts,
                   warnings=[str(w.message) for w in caught])
    # Outside jit the batch is a concrete array: its sharding is read.
    k = 4
    tx = accum_jax.accumulate(optax.sgd(1.0), k)
    state = jax.jit(tx.init)(ps)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      _, updates, _ = accum_jax.value_and_update(loss_fn, tx)(ps, state, bs)
    plan = _sharding.plan(None, None, 'per_microbatch', ps, bs, k)
    rec.record('auto/eager', updates, want, axes=list(plan.axes),
               warnings=[str(w.message) for w in caught])
    # Under jit the params' shardings are hidden too: named batch axes warn
    # until param_specs declares them.
    want_grad = jax.value_and_grad(loss_fn)(params, batch)
    for name, opts in (('hidden', {}), ('declared', {'param_specs': P()})):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got, counts = rec.run(accum_jax.value_and_grad(
            loss_fn, k, axis_name='data', **opts), ps, bs)
      rec.record(f'auto/params_{name}', got, want_grad, counts,
                 warnings=[str(w.message) for w in caught])
  # FSDP on Auto axes (MaxText's convention), its specs declared: the
  # params stay sharded, gathered per micro-batch.
  fsdp = {'w1': P('data'), 'b1': P('data'), 'w2': P(None, 'data')}
  grad_checks(rec, mesh, fsdp, 'auto_fsdp', ks=(1, 4), axis_name='data',
              param_specs=fsdp)
  update_checks(rec, mesh, fsdp, 'auto_fsdp', ks=(1, 4), axis_name='data',
                param_specs=fsdp)


if os.environ.get('ACCUM_JAX_TEST_ACCELERATOR_BRANCHES'):
  from tests import _accelerator_branches  # noqa: E402
  _accelerator_branches.apply()

def main(config):
  if config == '2d':
    # Data axis explicit (read from the batch), model axis left to GSPMD.
    mesh = jax.make_mesh((4, 2), ('data', 'model'),
                         axis_types=(AxisType.Explicit, AxisType.Auto))
  elif config == 'auto':
    mesh = Mesh(np.array(jax.devices()), ('data',))  # Auto axes
    assert mesh.axis_types == (AxisType.Auto,)
  else:
    mesh = _compat.make_mesh((8,), ('data',))
  rec = Recorder(mesh, 'data')
  if config == 'dp':
    replicated = {'w1': P(), 'b1': P(), 'w2': P()}
    grad_checks(rec, mesh, replicated, 'dp')
    update_checks(rec, mesh, replicated, 'dp')
    weighted_aux_checks(rec, mesh, replicated, 'dp')
    dp_extra(rec, mesh)
    part_full_checks(rec, mesh, replicated, 'dp')
    # Six devices: the seed cannot be scaled exactly, so it joins after.
    six = _compat.make_mesh((6,), ('data',), devices=jax.devices()[:6])
    part_full_checks(rec, six, replicated, 'dp6', rows=48)
  elif config == 'fsdp':
    fsdp = {'w1': P('data'), 'b1': P('data'), 'w2': P(None, 'data')}
    for mode in ('per_microbatch', 'per_step'):
      grad_checks(rec, mesh, fsdp, f'fsdp_{mode}', fsdp_reduce=mode)
      update_checks(rec, mesh, fsdp, f'fsdp_{mode}', fsdp_reduce=mode)
      weighted_aux_checks(rec, mesh, fsdp, f'fsdp_{mode}', fsdp_reduce=mode)
      part_full_checks(rec, mesh, fsdp, f'fsdp_{mode}', fsdp_reduce=mode)
    cross_step_checks(rec, mesh, fsdp, 'fsdp')
    cast_checks(rec, mesh, 'mlp', bf16_loss, make_params(), fsdp)
    cast_checks(rec, mesh, 'linen', *linen_bf16())
  elif config == '2d':
    tp = {'w1': P(None, 'model'), 'b1': P('model'), 'w2': P('model')}
    grad_checks(rec, mesh, tp, 'tp')
    update_checks(rec, mesh, tp, 'tp')
    tp_fsdp = {'w1': P('data', 'model'), 'b1': P('model'),
               'w2': P('model', 'data')}
    grad_checks(rec, mesh, tp_fsdp, 'tp_fsdp')
    update_checks(rec, mesh, tp_fsdp, 'tp_fsdp', ks=(2, 8))
    weighted_aux_checks(rec, mesh, tp_fsdp, 'tp_fsdp')
    part_full_checks(rec, mesh, tp_fsdp, 'tp_fsdp')
  elif config == 'auto':
    auto_checks(rec, mesh)
  else:
    raise SystemExit(f'unknown configuration {config!r}')
  rec.out['xla'] = {'combines_all_reduces': _hlo.combines_all_reduces(
      mesh, 'data')}
  print(json.dumps(rec.out))


if __name__ == '__main__':
  main(sys.argv[1])
