"""Compiled for GPUs and TPUs without one: per-device memory and collectives.

  python -m benchmarks.aot --target h100:8          # needs jax[cuda12]
  python -m benchmarks.aot --target tpu:v5e:2x4     # needs jax[tpu]
  python -m benchmarks.aot --target cpu:8           # XLA:CPU, 8 host devices

Every step is lowered with ``jax.ShapeDtypeStruct`` arguments placed on the
target's compile-only devices (:mod:`accum_jax._targets`) and compiled by the
target's own compiler; nothing runs. Per-device peak = argument + output +
temporaries - aliased (params and optimizer state donated), XLA's
``memory_analysis()``. Collectives are counted in the optimized HLO, inside
the micro-batch loop and after it (:mod:`benchmarks.hlo`).

Two tables:

* ``paths``: :mod:`benchmarks.memory_paths`' rows (each in-step path against
  its hand-written twin, k=1 against the full batch) on one device, at a size
  where XLA:TPU reports its temporaries: a 4096 x 6 tanh MLP, batch 256, k=8,
  adam, ``apply_updates`` in the step.
* ``lm``: a token-weighted GPT-style LM (4 layers, d=1024, vocab 32k,
  sequence 512, float32 params, bfloat16 compute, adamw, k=4, 8 sequences per
  device) on one device, data parallel (params replicated) and FSDP (params
  sharded over the data axis), under Auto and Explicit mesh axes. The twin is
  MaxText's accumulation: a ``lax.scan`` with a fresh float32 zeros carry
  (constrained to the params' sharding) that sums token-loss gradients,
  divided once by the token count.

Writes ``aot_<target>.json`` and ``aot_<target>.md`` to ``--out``.
"""

import argparse
import json
import os
import sys
import time


def _preset_cpu_devices(argv):
  """``cpu:<n>`` needs the host device count set before jax is imported."""
  for i, a in enumerate(argv):
    value = a.split('=', 1)[1] if a.startswith('--target=') else (
        argv[i + 1] if a == '--target' and i + 1 < len(argv) else None)
    if value and value.startswith('cpu:'):
      os.environ['XLA_FLAGS'] = (
          os.environ.get('XLA_FLAGS', '') +
          f' --xla_force_host_platform_device_count={value.split(":")[1]}')


if __name__ == '__main__':
  _preset_cpu_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import accum_jax  # noqa: E402
from accum_jax import _compat, _targets  # noqa: E402
from benchmarks import hlo, memory_paths  # noqa: E402

MIB = 2 ** 20
DONATE = (0, 1)


def mesh_for(devices, kind):
  """A 1-D ``('data',)`` mesh over ``devices`` with ``kind`` axes."""
  axis_type = {'auto': AxisType.Auto, 'explicit': AxisType.Explicit}[kind]
  return jax.sharding.Mesh(np.array(devices), ('data',),
                           axis_types=(axis_type,))


def placed(tree, mesh, spec_fn):
  """``tree``'s shapes as ShapeDtypeStructs sharded by ``spec_fn(leaf)``."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=NamedSharding(mesh, spec_fn(s))),
      tree)


def compile_step(step, args, mesh):
  """``step`` compiled for ``args``' devices, params and opt_state donated."""
  with _compat.set_mesh(mesh):
    return jax.jit(step, donate_argnums=DONATE).lower(*args).compile()


def figures(compiled, mesh=None):
  """Per-device peak and its parts (MiB), the collectives along ``'data'``
  inside and after the loop, and the element types of the all-gathers in
  the loop."""
  m = compiled.memory_analysis()
  out = {'argument': m.argument_size_in_bytes / MIB,
         'output': m.output_size_in_bytes / MIB,
         'temp': m.temp_size_in_bytes / MIB,
         'alias': m.alias_size_in_bytes / MIB}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  if mesh is not None and mesh.size > 1:
    counts = hlo.count_collectives(compiled, mesh, 'data')
    out['inside'] = {op: n for op, n in counts['inside'].items() if n}
    out['after'] = {op: n for op, n in counts['outside'].items() if n}
    out['gathered'] = hlo.collective_dtypes(compiled, 'all-gather',
                                            loops_only=True)
  return out


# -- the path table ---------------------------------------------------------


def path_rows(devices, k=8):
  """memory_paths' rows, compiled for one device of the target."""
  mesh = mesh_for(devices[:1], 'explicit')
  params, batch = memory_paths.setup(width=4096, depth=6, batch_size=256)
  rows = []
  for name, ours, twin, extra in memory_paths.rows(k):
    row = {'path': name}
    for who, (step, init) in (('accum_jax', ours), ('twin', twin)):
      opt_state = jax.eval_shape(init, params)
      args = [placed(x, mesh, lambda s: P())
              for x in (params, opt_state, batch, *extra)]
      row[who] = figures(compile_step(step, args, mesh))
    row['ratio'] = row['accum_jax']['peak'] / row['twin']['peak']
    rows.append(row)
    print(f"  {name}: {row['accum_jax']['peak']:.1f} / "
          f"{row['twin']['peak']:.1f} MiB = {row['ratio']:.3f}", flush=True)
  return rows


def cross_step_row(devices, k=8):
  """One cross-step call (a micro-batch of 32 rows) of ``optax.MultiSteps``
  and of ``accumulate``'s ``tx.update``, on the path table's MLP."""
  mesh = mesh_for(devices[:1], 'explicit')
  params, batch = memory_paths.setup(width=4096, depth=6, batch_size=32)
  inner = optax.adam(1e-3)
  row = {'param_mib': sum(
      np.prod(p.shape) * 4 for p in jax.tree.leaves(params)) / MIB}
  for who, tx in (('optax.MultiSteps', optax.MultiSteps(inner, k)),
                  ('accum_jax', accum_jax.accumulate(inner, k))):

    def step(params, opt_state, microbatch, tx=tx):
      loss, grads = jax.value_and_grad(memory_paths.loss_fn)(params,
                                                             microbatch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return loss, optax.apply_updates(params, updates), opt_state

    opt_state = jax.eval_shape(tx.init, params)
    args = [placed(x, mesh, replicated) for x in (params, opt_state, batch)]
    row[who] = figures(compile_step(step, args, mesh))
  row['ratio'] = row['accum_jax']['peak'] / row['optax.MultiSteps']['peak']
  print(f"  cross-step call: {row['accum_jax']['peak']:.1f} / "
        f"{row['optax.MultiSteps']['peak']:.1f} MiB = {row['ratio']:.3f}",
        flush=True)
  return row


def noise_readers(devices, k=8):
  """``{'accum_jax': [...], 'twin': [...]}``: the readers of each 4096 x 4096
  weight gradient made in the loop (:func:`benchmarks.hlo.loop_readers`),
  with the noise scale tracked, and in the twin that takes each micro-batch
  gradient's squared norm. XLA:GPU's matmuls only (empty elsewhere)."""
  mesh = mesh_for(devices[:1], 'explicit')
  params, batch = memory_paths.setup(width=4096, depth=6, batch_size=256)
  inner = optax.adam(1e-3)
  out = {}
  for who, (step, init) in (
      ('accum_jax', memory_paths.accum_step(inner, k, noise=True)),
      ('twin', memory_paths.twin_step(inner, k, noise=True))):
    opt_state = jax.eval_shape(init, params)
    args = [placed(x, mesh, lambda s: P()) for x in (params, opt_state, batch)]
    out[who] = hlo.loop_readers(compile_step(step, args, mesh),
                                'f32[4096,4096]')
  print(f"  noise scale, readers of each weight gradient: {out}", flush=True)
  return out


# -- the LM table -----------------------------------------------------------

LM = dict(layers=4, dim=1024, heads=8, vocab=32768, seq=512, per_device=8,
          k=4)


def lm_params(layers, dim, vocab, **_):
  f32 = jnp.float32
  block = {'qkv': jax.ShapeDtypeStruct((dim, 3 * dim), f32),
           'out': jax.ShapeDtypeStruct((dim, dim), f32),
           'up': jax.ShapeDtypeStruct((dim, 4 * dim), f32),
           'down': jax.ShapeDtypeStruct((4 * dim, dim), f32),
           'ln1': jax.ShapeDtypeStruct((dim,), f32),
           'ln2': jax.ShapeDtypeStruct((dim,), f32)}
  return {'embed': jax.ShapeDtypeStruct((vocab, dim), f32),
          'blocks': [dict(block) for _ in range(layers)],
          'ln_f': jax.ShapeDtypeStruct((dim,), f32)}


def _norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)
  return (x32 * scale).astype(x.dtype)


def _explicit(x):
  mesh = jax.typeof(x).sharding.mesh
  return AxisType.Explicit in getattr(mesh, 'axis_types', ())


def _gathered(w):
  """A parameter whole on every device: under Explicit axes the step says
  so (FSDP's all-gather); under Auto axes the partitioner decides."""
  return jax.sharding.reshard(w, P()) if _explicit(w) else w


def token_losses(params, tokens, heads=LM['heads']):
  """Per-token next-token losses, bfloat16 compute."""
  p = jax.tree.map(lambda w: _gathered(w).astype(jnp.bfloat16), params)
  ids = tokens[:, :-1]
  if _explicit(ids):
    x = p['embed'].at[ids].get(out_sharding=jax.typeof(ids).sharding)
  else:
    x = p['embed'][ids]
  b, t, d = x.shape
  mask = jnp.tril(jnp.ones((t, t), jnp.bool_))
  for blk in p['blocks']:
    h = _norm(x, blk['ln1'])
    q, k, v = jnp.split(h @ blk['qkv'], 3, -1)
    q, k, v = (z.reshape(b, t, heads, d // heads) for z in (q, k, v))
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // heads)
    s = jnp.where(mask, s.astype(jnp.float32), -1e9)
    a = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s).astype(x.dtype), v)
    x = x + a.reshape(b, t, d) @ blk['out']
    x = x + jax.nn.gelu(_norm(x, blk['ln2']) @ blk['up']) @ blk['down']
  logits = (_norm(x, p['ln_f']) @ p['embed'].T).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         tokens[:, 1:])


def token_count(batch):
  return jnp.sum(batch['valid'][:, 1:]).astype(jnp.float32)


def token_sum(params, batch):
  return jnp.sum(jnp.where(batch['valid'][:, 1:],
                           token_losses(params, batch['tokens']), 0.0))


def token_mean(params, batch):
  return token_sum(params, batch) / jnp.maximum(token_count(batch), 1.0)


def lm_twin(inner, k, param_shardings):
  """MaxText's accumulation: token-loss sums in a fresh f32 carry."""

  def step(params, opt_state, batch):
    xs = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]),
                      batch)

    def body(carry, j):
      acc, loss_sum, n = carry
      mb = jax.tree.map(lambda x: x[:, j], xs)
      loss, grads = jax.value_and_grad(token_sum)(params, mb)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return (acc, loss_sum + loss, n + token_count(mb)), None

    acc0 = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    if param_shardings is not None and not _explicit(batch['tokens']):
      acc0 = jax.lax.with_sharding_constraint(acc0, param_shardings)
    (acc, loss_sum, n), _ = jax.lax.scan(
        body, (acc0, jnp.zeros([]), jnp.zeros([])), jnp.arange(k))
    grads = jax.tree.map(lambda a: a / n, acc)
    updates, opt_state = inner.update(grads, opt_state, params)
    return loss_sum / n, optax.apply_updates(params, updates), opt_state

  return step, inner.init


def lm_accum(inner, k, axis_name, cross_step=True, param_specs=None):
  tx = accum_jax.accumulate(inner, k, cross_step=cross_step)
  grad_step = accum_jax.value_and_update(token_mean, tx, weight_fn=token_count,
                                         axis_name=axis_name,
                                         param_specs=param_specs)

  def step(params, opt_state, batch):
    loss, updates, opt_state = grad_step(params, opt_state, batch)
    return loss, optax.apply_updates(params, updates), opt_state

  return step, tx.init


def lm_micro_step(tx):
  """One cross-step call on one micro-batch (``optax.MultiSteps`` or
  ``accumulate``'s ``tx.update``), weighted by its token count."""
  takes_weight = isinstance(tx, accum_jax.AccumulateTransformation)

  def step(params, opt_state, microbatch):
    loss, grads = jax.value_and_grad(token_mean)(params, microbatch)
    extra = {'weight': token_count(microbatch)} if takes_weight else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return loss, optax.apply_updates(params, updates), opt_state

  return step, tx.init


def lm_full(inner):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(token_mean)(params, batch)
    updates, opt_state = inner.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state

  return step, inner.init


def replicated(_):
  return P()


def batch_spec(_):
  return P('data')


def state_spec(param_spec):
  """The optimizer state's spec: a parameter's for its moments, replicated
  for scalars (counts)."""
  return lambda s: param_spec(s) if s.ndim else P()


def fsdp_spec(s):
  """Shard a parameter's largest dimension that 8 divides over 'data'."""
  if len(s.shape) < 2:
    return P()
  dim = int(np.argmax(s.shape))
  return P(*[('data' if i == dim else None) for i in range(len(s.shape))])


CROSS_STEP = ('optax.MultiSteps', 'accum_jax cross-step')

LAYOUTS = (('one device', 1, 'explicit', False),
           ('data parallel, Auto axes', None, 'auto', False),
           ('data parallel, Explicit axes', None, 'explicit', False),
           ('FSDP, Auto axes', None, 'auto', True),
           ('FSDP, Explicit axes', None, 'explicit', True))


def lm_rows(devices, layouts=None, only=None):
  """The LM table's rows: each layout whose name contains one of
  ``layouts`` (all by default), each contender named in ``only`` (all by
  default)."""
  cfg = LM
  params = lm_params(**cfg)
  inner = optax.adamw(1e-4, weight_decay=0.1)
  rows = []
  for name, ndev, kind, fsdp in LAYOUTS:
    if layouts and not any(s in name for s in layouts):
      continue
    devs = devices[:ndev] if ndev else devices
    mesh = mesh_for(devs, kind)
    n = len(devs)
    batch = {'tokens': jax.ShapeDtypeStruct((cfg['per_device'] * n,
                                             cfg['seq'] + 1), jnp.int32),
             'valid': jax.ShapeDtypeStruct((cfg['per_device'] * n,
                                            cfg['seq'] + 1), jnp.bool_)}
    pspec = fsdp_spec if fsdp else replicated
    params_in = placed(params, mesh, pspec)
    shardings = jax.tree.map(lambda s: s.sharding, params_in)
    # On Auto axes the params' shardings are hidden under jit: they are
    # declared, as a MaxText user passes the jit's in_shardings.
    axis = 'data' if n > 1 else None
    declared = shardings if kind == 'auto' and n > 1 else None
    contenders = {
        'twin': lm_twin(inner, cfg['k'], shardings if fsdp else None),
        'accum_jax': lm_accum(inner, cfg['k'], axis, param_specs=declared),
        'cross_step=False': lm_accum(inner, cfg['k'], axis, cross_step=False,
                                     param_specs=declared),
        'full batch': lm_full(inner),
        # Cross-step contenders: one call per micro-batch (1/k of the batch).
        'optax.MultiSteps': lm_micro_step(optax.MultiSteps(inner, cfg['k'])),
        'accum_jax cross-step': lm_micro_step(
            accum_jax.accumulate(inner, cfg['k'])),
    }
    if only:
      contenders = {w: c for w, c in contenders.items() if w in only}
    row = {'layout': name, 'devices': n}
    for who, (step, init) in contenders.items():
      opt_state = jax.eval_shape(init, params)
      data = batch
      if who in CROSS_STEP:
        data = jax.tree.map(lambda b: jax.ShapeDtypeStruct(
            (b.shape[0] // cfg['k'], *b.shape[1:]), b.dtype), batch)
      args = (params_in, placed(opt_state, mesh, state_spec(pspec)),
              placed(data, mesh, batch_spec))
      start = time.perf_counter()
      try:
        row[who] = figures(compile_step(step, args, mesh), mesh)
      except Exception as e:  # noqa: BLE001 - reported in the table
        row[who] = {'error': f'{type(e).__name__}: {str(e)[:200]}'}
      row[who]['compile_s'] = time.perf_counter() - start
    def ratio(a, b, row=row):
      if 'peak' in row.get(a, {}) and 'peak' in row.get(b, {}):
        return row[a]['peak'] / row[b]['peak']
      return float('nan')

    row['ratio'] = ratio('accum_jax', 'twin')
    row['in_step_ratio'] = ratio('cross_step=False', 'twin')
    row['vs_full'] = ratio('accum_jax', 'full batch')
    ok = row['ratio'] == row['ratio']
    rows.append(row)
    print(f'  {name}: ' + ', '.join(
        f"{w} {row[w].get('peak', float('nan')):.0f} MiB"
        f" {row[w].get('inside', '')}" for w in contenders)
        + (f" -> {row['ratio']:.3f}" if ok else ''), flush=True)
  return rows


# -- report -----------------------------------------------------------------


def _ops(d):
  return ', '.join(f'{n} {op}' for op, n in sorted(d.items())) or '0'


def markdown(result):
  lines = [f"## {result['target']} ({result['platform']}, jax "
           f"{result['jax']}), compile only", '']
  if result.get('paths'):
    lines += ['Paths: 4096 x 6 tanh MLP, batch 256, k=8, adam, '
              '`apply_updates` in the step, one device.', '',
              '| path | accum_jax MiB (temp) | twin MiB (temp) | ratio |',
              '|---|---:|---:|---:|']
    for r in result['paths']:
      a, t = r['accum_jax'], r['twin']
      lines.append(f"| {r['path']} | {a['peak']:.1f} ({a['temp']:.1f}) | "
                   f"{t['peak']:.1f} ({t['temp']:.1f}) | {r['ratio']:.3f} |")
    lines.append('')
  readers = result.get('noise_readers')
  if readers and readers['accum_jax']:
    lines += ['`track_noise_scale=True`: the readers of each 4096 x 4096 '
              'weight gradient in the loop (the matmul that makes it feeds '
              f"them): accum_jax {readers['accum_jax']}, the twin taking "
              f"each norm {readers['twin']}.", '']
  if result.get('cross_step'):
    r = result['cross_step']
    lines += ['One cross-step call on a micro-batch of 32 rows, same MLP: '
              f"accum_jax `tx.update` {r['accum_jax']['peak']:.1f} MiB "
              f"(temp {r['accum_jax']['temp']:.1f}), `optax.MultiSteps` "
              f"{r['optax.MultiSteps']['peak']:.1f} MiB (temp "
              f"{r['optax.MultiSteps']['temp']:.1f}): {r['ratio']:.3f}.", '']
  if result.get('lm'):
    lines += ['LM: 4 layers, d=1024, vocab 32k, sequence 512, f32 params, '
              'bf16 compute, adamw, k=4, 8 sequences per device; per-device '
              'MiB; collectives along the data axis in the loop / after it.',
              '',
              '| layout | accum_jax | cross_step=False | twin | full batch | '
              'MultiSteps (1 call) | accum_jax cross-step (1 call) | '
              'accum / twin | cross_step=False / twin | accum / full | '
              'accum_jax in loop / after | twin in loop / after |',
              '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|']
    for r in result['lm']:
      def cell(w, r=r):
        if w not in r:
          return '-'
        return (f"{r[w]['peak']:.0f}" if 'peak' in r[w]
                else r[w]['error'][:60])

      def coll(w, r=r):
        if 'inside' not in r.get(w, {}):
          return '-'
        return f"{_ops(r[w]['inside'])} / {_ops(r[w]['after'])}"

      lines.append(
          f"| {r['layout']} | {cell('accum_jax')} | "
          f"{cell('cross_step=False')} | {cell('twin')} | "
          f"{cell('full batch')} | {cell('optax.MultiSteps')} | "
          f"{cell('accum_jax cross-step')} | {r['ratio']:.3f} | "
          f"{r['in_step_ratio']:.3f} | "
          f"{r['vs_full']:.3f} | {coll('accum_jax')} | "
          f"{coll('twin')} |")
    lines.append('')
    gathers = [
        f"{r['layout']}: accum_jax {_ops(r['accum_jax']['gathered'])}, twin "
        f"{_ops(r['twin'].get('gathered', {}))}" for r in result['lm']
        if r.get('accum_jax', {}).get('gathered')]
    if gathers:
      lines += ['All-gathers in the loop by element type: '
                + '; '.join(gathers) + '.', '']
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m benchmarks.aot',
                              description=__doc__.splitlines()[0])
  p.add_argument('--target', required=True,
                 help="'h100:8', 'tpu:v5e:2x4', 'cpu:8', ...")
  p.add_argument('--tables', default='paths,lm')
  p.add_argument('--layouts', default='',
                 help='comma-separated substrings of the LM layouts to run')
  p.add_argument('--out', default=os.path.join('benchmarks', 'results'))
  args = p.parse_args(argv)
  devices = _targets.devices(args.target)
  tables = args.tables.split(',')
  result = {'target': args.target, 'platform': devices[0].platform,
            'jax': jax.__version__}
  print(f'{args.target}: {len(devices)} x {devices[0].device_kind}')
  if 'paths' in tables:
    result['paths'] = path_rows(devices)
    result['cross_step'] = cross_step_row(devices)
    result['noise_readers'] = noise_readers(devices)
  if 'lm' in tables:
    result['lm'] = lm_rows(devices, [s for s in args.layouts.split(',') if s])
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, 'aot_' + args.target.replace(':', '_'))
  with open(stem + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  with open(stem + '.md', 'w') as f:
    f.write(markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
