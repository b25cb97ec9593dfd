"""Compile time of the train step against the number of parameter leaves.

A value_and_update step (``accumulate(optax.adam(1e-3), 8, nonfinite=...)``,
updates applied inside the jit) on tanh MLPs of width 8 with ``L`` layers
(``2L`` leaves), for each non-finite policy, plus the cross-step
``tx.update``. Lowering (``jit(f).lower``) and XLA compilation
(``.compile()``) are timed separately, once per case (a fresh trace each
time: the transform is rebuilt per case, so no jit cache is shared).

  PYTHONPATH=$PWD python -m benchmarks.compile_time [--layers 25,50,100]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import accum_jax

WIDTH, BATCH, K = 8, 16, 8
POLICIES = ('propagate', 'skip_microbatch', 'skip_step')


def init_params(layers):
  keys = jax.random.split(jax.random.key(0), layers)
  return [{'w': jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5,
           'b': jnp.zeros(WIDTH)} for k in keys]


def loss_fn(params, batch):
  h = batch['x']
  for layer in params:
    h = jnp.tanh(h @ layer['w'] + layer['b'])
  return jnp.mean((h - batch['y']) ** 2)


def time_compile(fn, *args):
  """Lower seconds, compile seconds and optimized HLO lines of ``jit(fn)``.

  The line count of the optimized HLO does not depend on the machine's load:
  it shows how the program XLA generates code for grows with the leaves.
  """
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - lowered_at
  return lowered_at - start, compile_s, len(compiled.as_text().splitlines())


def in_step(tx):
  def step(params, opt_state, batch):
    loss, updates, opt_state = accum_jax.value_and_update(loss_fn, tx)(
        params, opt_state, batch)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def cross_step(tx):
  def step(grads, opt_state, params):
    return tx.update(grads, opt_state, params)
  return step


def measure(layers, policies, modes):
  params = init_params(layers)
  batch = {'x': jnp.ones((BATCH, WIDTH)), 'y': jnp.zeros((BATCH, WIDTH))}
  rows = []
  for mode in modes:
    for policy in policies:
      tx = accum_jax.accumulate(optax.adam(1e-3), K, nonfinite=policy)
      state = tx.init(params)
      if mode == 'in-step':
        timed = time_compile(in_step(tx), params, state, batch)
      else:
        timed = time_compile(cross_step(tx), params, state, params)
      lower_s, compile_s, hlo_lines = timed
      rows.append(dict(mode=mode, layers=layers, leaves=2 * layers,
                       policy=policy, lower_s=lower_s, compile_s=compile_s,
                       hlo_lines=hlo_lines))
      print(f'  {mode:10s} leaves={2 * layers:4d} {policy:15s} '
            f'lower {lower_s:6.2f} s  compile {compile_s:7.2f} s  '
            f'HLO {hlo_lines} lines', flush=True)
  return rows


def print_table(rows):
  print('\nmode        leaves  policy           lower_s  compile_s  '
        'HLO_lines  compile/propagate')
  base = {(r['mode'], r['leaves']): r['compile_s'] for r in rows
          if r['policy'] == 'propagate'}
  for r in rows:
    ref = base.get((r['mode'], r['leaves']))
    ratio = f'{r["compile_s"] / ref:6.2f}x' if ref else '     -'
    print(f'{r["mode"]:10s}  {r["leaves"]:6d}  {r["policy"]:15s}  '
          f'{r["lower_s"]:7.2f}  {r["compile_s"]:9.2f}  {r["hlo_lines"]:9d}  '
          f'{ratio}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', default='25,50,100,200,250',
                      help='comma-separated layer counts (2 leaves each)')
  parser.add_argument('--policies', default=','.join(POLICIES))
  parser.add_argument('--modes', default='in-step,cross-step')
  args = parser.parse_args(argv)
  policies = args.policies.split(',')
  modes = args.modes.split(',')
  print(f'jax {jax.__version__}, optax {optax.__version__}, '
        f'{jax.devices()[0].platform}; width {WIDTH}, k={K}, adam')
  rows = []
  for layers in map(int, args.layers.split(',')):
    rows += measure(layers, policies, modes)
  print_table(rows)
  return rows


if __name__ == '__main__':
  main()
