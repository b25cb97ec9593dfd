"""What ``track_noise_scale=True`` costs: compiled memory and step time.

The in-step train step of ``benchmarks/contenders.py`` (``value_and_update``
with adam, params and optimizer state donated, updates applied inside the
jit; the LM token-weighted with ``weight_fn``) is compiled twice per model,
with and without the noise scale, and both are timed in alternation (the
median of ``--repeats`` rounds of ``--steps`` steps each).

  PYTHONPATH=$PWD python benchmarks/noise_scale_cost.py --size small --k 8
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accum_jax
from benchmarks import models


def make_step(model, k, track):
  tx = accum_jax.accumulate(optax.adam(1e-3), k, track_noise_scale=track)
  grad_step = accum_jax.value_and_update(
      lambda p, b, s, rng: model.mean_loss(p, b, s, rng), tx, has_aux=True,
      weight_fn=model.weight_fn)

  def step(params, opt_state, state, batch, rng):
    (loss, state), updates, opt_state = grad_step(params, opt_state, batch,
                                                  state, rng=rng)
    return optax.apply_updates(params, updates), opt_state, state, loss

  return tx, step


def measure(name, size, k, steps, repeats):
  model = models.make(name, size, jnp.float32)
  rng = jax.random.key(0)
  runs = {}
  for track in (False, True):
    tx, step = make_step(model, k, track)
    args = (model.params, tx.init(model.params), model.state, model.batch,
            rng)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    memory = accum_jax.compiled_memory(compiled)
    fresh = jax.jit(lambda p, s: (jax.tree.map(jnp.copy, p),
                                  jax.tree.map(jnp.copy, s)))
    params, opt_state = fresh(model.params, tx.init(model.params))
    runs[track] = {'compiled': compiled, 'params': params,
                   'opt_state': opt_state, 'peak': memory.peak_bytes,
                   'temp': memory.temp_bytes, 'times': []}
  for run in runs.values():  # warm-up
    run['params'], run['opt_state'], _, loss = run['compiled'](
        run['params'], run['opt_state'], model.state, model.batch, rng)
    jax.block_until_ready(loss)
  for _ in range(repeats):
    for run in runs.values():  # alternate: both see the same machine load
      start = time.perf_counter()
      for _ in range(steps):
        run['params'], run['opt_state'], _, loss = run['compiled'](
            run['params'], run['opt_state'], model.state, model.batch, rng)
      jax.block_until_ready(loss)
      run['times'].append((time.perf_counter() - start) / steps)
  off, on = runs[False], runs[True]
  est = accum_jax.noise_scale(on['opt_state'])
  return {
      'model': model.name, 'k': k,
      'peak_mib_off': off['peak'] / 2**20, 'peak_mib_on': on['peak'] / 2**20,
      'memory_ratio': on['peak'] / off['peak'],
      'step_ms_off': 1e3 * float(np.median(off['times'])),
      'step_ms_on': 1e3 * float(np.median(on['times'])),
      'time_ratio': float(np.median(on['times']) / np.median(off['times'])),
      'b_simple': float(est.b_simple),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', default='small', choices=list(models.SIZES))
  parser.add_argument('--k', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--models', default='mlp,lm')
  parser.add_argument('--json', default=None, help='write the rows here')
  args = parser.parse_args(argv)
  rows = [measure(name, args.size, args.k, args.steps, args.repeats)
          for name in args.models.split(',')]
  print(f'{jax.devices()[0].platform}, size {args.size}, k={args.k}')
  print('| model | peak MiB off | peak MiB on | memory | step ms off | '
        'step ms on | time |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['peak_mib_off']:.2f} | {r['peak_mib_on']:.2f}"
          f" | {r['memory_ratio']:.4f} | {r['step_ms_off']:.2f} | "
          f"{r['step_ms_on']:.2f} | {r['time_ratio']:.3f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == '__main__':
  main()
