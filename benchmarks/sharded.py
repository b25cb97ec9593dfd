"""Sharded accumulation on 8 CPU devices: step time, collectives and memory.

  python -m benchmarks.sharded            # default run, a few minutes on CPU
  python -m benchmarks.sharded --quick    # smoke run

Compares, for ``k`` in {1, 4, 16}, one optimizer step (adam, params and
optimizer state donated, updates applied in the same jit) of

* ``naive``: a hand-written ``lax.scan`` over strided micro-batches under
  ``jax.jit`` with the mesh set, the partitioner (GSPMD) placing the
  gradient reductions;
* ``accum_jax``: :func:`accum_jax.value_and_update` (one reduction after the
  loop), and for FSDP both ``fsdp_reduce`` modes.

on a data-parallel mesh (replicated params) and an FSDP mesh (params sharded
over the data axis). For each step it reports the median step time (the
variants of a cell are timed interleaved), the collectives that communicate
along the data axis inside / outside the micro-batch loop (parsed from the
compiled HLO), and the compiled memory per device (argument + output +
temporaries - aliased). Writes ``sharded.json`` and ``sharded.md`` to
``--out``.

The device count is forced to 8 before jax is imported, so run this as its
own process.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import accum_jax  # noqa: E402
from accum_jax import _compat  # noqa: E402
from benchmarks import hlo as _hlo  # noqa: E402

OPS = ('all-reduce', 'reduce-scatter', 'all-gather', 'all-to-all',
       'collective-permute')


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog='python -m benchmarks.sharded',
                              description=__doc__.split('\n')[0])
  p.add_argument('--out', default=os.path.join('benchmarks', 'results'))
  p.add_argument('--quick', action='store_true',
                 help='small model, 3 timed steps')
  p.add_argument('--ks', default='1,4,16')
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--reps', type=int, default=10)
  return p.parse_args(argv)


def init_params(layers, width):
  keys = jax.random.split(jax.random.key(0), layers)
  return [{'w': jax.random.normal(k, (width, width)) / width ** 0.5,
           'b': jnp.zeros(width)} for k in keys]


def loss_fn(params, batch):
  h = batch['x']
  for p in params:
    h = jnp.tanh(h @ p['w'] + p['b'])
  return jnp.mean((h - batch['y']) ** 2)


def naive_step(tx, k, gather):
  """A hand-written strided scan; ``gather`` all-gathers FSDP params."""

  def step(params, opt_state, batch):
    split = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]), batch)

    def loss(p, mb):
      if gather:  # explicit axes: FSDP params are gathered for the matmuls
        p = jax.tree.map(lambda x: jax.sharding.reshard(x, P()), p)
      return loss_fn(p, mb)

    def body(carry, j):
      mb = jax.tree.map(
          lambda x: jax.lax.dynamic_index_in_dim(x, j, 1, False), split)
      value, grads = jax.value_and_grad(loss)(params, mb)
      return jax.tree.map(jnp.add, carry, (value, grads)), None

    zeros = (jnp.zeros([]), jax.tree.map(jnp.zeros_like, params))
    (value, grads), _ = jax.lax.scan(body, zeros, jnp.arange(k))
    grads = jax.tree.map(lambda g: g / k, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value / k

  return step


def accum_step(tx, **options):
  def step(params, opt_state, batch):
    value, updates, opt_state = accum_jax.value_and_update(
        loss_fn, tx, **options)(params, opt_state, batch)
    return optax.apply_updates(params, updates), opt_state, value

  return step


def variants(layout, k):
  """``(name, make_tx, make_step)`` for one mesh layout and ``k``."""
  inner = optax.adam(1e-3)
  acc = accum_jax.accumulate(optax.adam(1e-3), k)
  out = [('naive', inner, naive_step(inner, k, gather=layout == 'fsdp'))]
  if layout == 'dp':
    out.append(('accum_jax', acc, accum_step(acc)))
  else:
    out.append(('accum_jax per_microbatch (default)', acc,
                accum_step(acc, fsdp_reduce='per_microbatch')))
    out.append(('accum_jax per_step', acc,
                accum_step(acc, fsdp_reduce='per_step')))
  return out


def memory_mib(compiled):
  return accum_jax.compiled_memory(compiled).peak_bytes / 2 ** 20


def run_cell(mesh, layout, k, args):
  # numpy: device_put may alias a jax array, and the step donates it.
  params0 = jax.tree.map(np.asarray, init_params(args.layers, args.width))
  spec = P('data') if layout == 'fsdp' else P()
  rng = np.random.RandomState(0)
  batch = {'x': rng.randn(args.batch, args.width).astype(np.float32),
           'y': rng.randn(args.batch, args.width).astype(np.float32)}
  rows = []
  with _compat.set_mesh(mesh):
    bs = jax.device_put(batch, NamedSharding(mesh, P('data')))
    live = []
    for name, tx, step in variants(layout, k):
      ps = jax.device_put(params0, NamedSharding(mesh, spec))
      state = jax.jit(tx.init)(ps)
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
          ps, state, bs).compile()
      counts = _hlo.count_collectives(compiled, mesh, 'data')
      ps, state, loss = compiled(ps, state, bs)  # warm up
      jax.block_until_ready(loss)
      live.append([name, compiled, ps, state, counts, memory_mib(compiled),
                   []])
    for rep in range(args.reps):
      order = live[rep % len(live):] + live[:rep % len(live)]
      for entry in order:
        _, compiled, ps, state, _, _, times = entry
        start = time.perf_counter()
        ps, state, loss = compiled(ps, state, bs)
        jax.block_until_ready((ps, state, loss))
        times.append(time.perf_counter() - start)
        entry[2], entry[3] = ps, state
  for name, _, _, _, counts, mem, times in live:
    q = np.percentile(times, [25, 75]) * 1e3
    rows.append({'layout': layout, 'k': k, 'variant': name,
                 'step_ms': statistics.median(times) * 1e3,
                 'step_ms_p25': float(q[0]), 'step_ms_p75': float(q[1]),
                 'memory_mib': mem,
                 'inside': counts['inside'], 'outside': counts['outside']})
  return rows


def reference_memory(mesh, k=8):
  """Compiled memory per device of the core's reference MLP step (6 layers
  1024 x 1024, adam, global batch 256), compile only."""
  args = argparse.Namespace(layers=6, width=1024, batch=256)
  rows = []
  with _compat.set_mesh(mesh):
    for layout, spec in (('dp', P()), ('fsdp', P('data'))):
      sharding = NamedSharding(mesh, spec)
      params = jax.tree.map(
          lambda s, sharding=sharding: jax.ShapeDtypeStruct(
              s.shape, s.dtype, sharding=sharding),
          jax.eval_shape(lambda: init_params(args.layers, args.width)))
      batch = {n: jax.ShapeDtypeStruct(
          (args.batch, args.width), jnp.float32,
          sharding=NamedSharding(mesh, P('data'))) for n in 'xy'}
      for name, tx, step in variants(layout, k):
        state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            params, state, batch).compile()
        rows.append({'layout': layout, 'k': k, 'variant': name,
                     'memory_mib': memory_mib(compiled)})
  return rows


def _fmt_counts(c):
  short = {'all-reduce': 'AR', 'reduce-scatter': 'RS', 'all-gather': 'AG',
           'all-to-all': 'A2A', 'collective-permute': 'CP'}
  parts = [f'{n} {short[op]}' for op, n in c.items() if n]
  return ', '.join(parts) or '0'


def markdown(result):
  cfg = result['config']
  out = [
      '# Sharded accumulation, 8 CPU devices',
      '',
      f"{cfg['layers']}-layer {cfg['width']}x{cfg['width']} tanh MLP, adam, "
      f"global batch {cfg['batch']}, mesh ('data': 8); jax "
      f"{result['jax']}, {result['machine']}. Collectives communicating "
      'along the data axis, per optimizer step, in the compiled HLO (AR '
      'all-reduce, RS reduce-scatter, AG all-gather; a combined all-reduce '
      'of many arrays counts once). "in loop" ops run once per micro-batch. '
      'Memory: compiled argument + output + temporaries - aliased, per '
      'device. Step time: median of interleaved runs (25th-75th '
      'percentile); CPU devices share the host cores, so the times show '
      'the extra work, not a network.',
      '',
      '| layout | k | variant | in loop | after loop | step ms | '
      'memory MiB |',
      '|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    out.append(
        f"| {r['layout']} | {r['k']} | {r['variant']} | "
        f"{_fmt_counts(r['inside'])} | {_fmt_counts(r['outside'])} | "
        f"{r['step_ms']:.1f} ({r['step_ms_p25']:.1f}-"
        f"{r['step_ms_p75']:.1f}) | {r['memory_mib']:.2f} |")
  if result.get('reference_memory'):
    out += ['', 'Compiled memory per device of the reference MLP (6 layers '
            '1024x1024, adam, global batch 256, k = 8), MiB:', '',
            '| layout | variant | memory MiB |', '|---|---|---|']
    out += [f"| {r['layout']} | {r['variant']} | {r['memory_mib']:.2f} |"
            for r in result['reference_memory']]
  return '\n'.join(out) + '\n'


def main(argv=None):
  args = parse_args(argv)
  if args.quick:
    args.layers, args.width, args.reps = 2, 128, 3
  ks = [int(k) for k in args.ks.split(',')]
  mesh = _compat.make_mesh((8,), ('data',))
  rows = []
  for layout in ('dp', 'fsdp'):
    for k in ks:
      rows.extend(run_cell(mesh, layout, k, args))
      print(markdown({'config': vars(args), 'rows': rows[-3:],
                      'jax': jax.__version__,
                      'machine': platform.machine()}).splitlines()[-1],
            flush=True)
  result = {'config': vars(args), 'jax': jax.__version__,
            'machine': f'{platform.machine()}, {os.cpu_count()} cores',
            'rows': rows,
            'reference_memory': (None if args.quick
                                 else reference_memory(mesh))}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'sharded.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, 'sharded.md'), 'w') as f:
    f.write(markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
