"""Step time and compiled peak of the benchmark CNN against ``unroll=``.

  PYTHONPATH=$PWD python -m benchmarks.unroll            # about 1-2 minutes
  PYTHONPATH=$PWD python -m benchmarks.unroll --rounds 3 --reps 5

The BatchNorm CNN of :mod:`benchmarks.models` (batch 64, 16x16 images), adam,
one optimizer step of ``accum_jax.value_and_update`` at ``k`` micro-batches
for each ``unroll``, and the full-batch step (``jax.value_and_grad`` on the
whole batch). Each step is compiled ahead with the params and optimizer state
donated; its peak is :func:`accum_jax.compiled_memory` (argument + output +
temporaries - aliased). The steps are timed interleaved, ``reps`` steps each
per round in a rotating order, so load on a shared machine hits them alike;
the table gives the median over all rounds and the spread (25th-75th
percentile) of the per-round medians. Writes
``benchmarks/results/unroll.{json,md}``.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accum_jax
from benchmarks import contenders, models


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog='python -m benchmarks.unroll',
                              description=__doc__.split('\n')[0])
  p.add_argument('--k', type=int, default=8)
  p.add_argument('--unrolls', default='1,2,8',
                 help='comma-separated unroll values (default: %(default)s)')
  p.add_argument('--size', default='small', choices=sorted(models.SIZES))
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--reps', type=int, default=10,
                 help='timed steps per step function and round')
  p.add_argument('--out', default=os.path.join('benchmarks', 'results'))
  return p.parse_args(argv)


class Step:
  """One compiled train step, its memory figures and its timings."""

  def __init__(self, contender, model):
    self.name = contender.name
    self.carry = jax.tree.map(jnp.copy, (model.params, contender.opt_state,
                                         model.state))
    self.batch, self.rng = model.batch, jax.random.key(1)
    self.compiled = jax.jit(contender.step,
                            donate_argnums=contenders.DONATE).lower(
                                *self.carry, self.batch, self.rng).compile()
    self.memory = accum_jax.compiled_memory(self.compiled)
    self.rounds = []

  def run(self):
    params, opt_state, state = self.carry
    params, opt_state, state, loss = self.compiled(params, opt_state, state,
                                                   self.batch, self.rng)
    jax.block_until_ready(loss)
    self.carry = (params, opt_state, state)
    return float(loss)


def measure(steps, rounds, reps):
  for step in steps:  # warm-up
    step.run()
  for r in range(rounds):
    times = {step.name: [] for step in steps}
    for rep in range(reps):
      shift = (r * reps + rep) % len(steps)
      for step in steps[shift:] + steps[:shift]:
        start = time.perf_counter()
        step.run()
        times[step.name].append(time.perf_counter() - start)
    for step in steps:
      step.rounds.append(times[step.name])


def main(argv=None):
  args = parse_args(argv)
  model = models.make('cnn', args.size, jnp.float32)
  inner = optax.adam(1e-3)
  unrolls = [True if u == 'True' else int(u) for u in args.unrolls.split(',')]
  steps = [Step(contenders.full_batch(model, inner, args.k), model)]
  for unroll in unrolls:
    steps.append(Step(contenders.accum_in_step(model, inner, args.k,
                                               unroll=unroll), model))
  steps[1].name += ' unroll=1'
  start = time.perf_counter()
  measure(steps, args.rounds, args.reps)
  rows = []
  for step in steps:
    flat = [t for r in step.rounds for t in r]
    per_round = [statistics.median(r) for r in step.rounds]
    rows.append({
        'name': step.name, 'median_ms': 1e3 * statistics.median(flat),
        'round_medians_ms': [1e3 * t for t in per_round],
        'p25_ms': 1e3 * float(np.percentile(per_round, 25)),
        'p75_ms': 1e3 * float(np.percentile(per_round, 75)),
        'peak_bytes': step.memory.peak_bytes,
        'temp_bytes': step.memory.temp_bytes, 'flops': step.memory.flops})
  out = {'k': args.k, 'size': args.size, 'rounds': args.rounds,
         'reps': args.reps, 'timing_s': time.perf_counter() - start,
         'jax': jax.__version__, 'backend': jax.default_backend(),
         'cpu_count': os.cpu_count(), 'rows': rows}
  lines = [f'CNN ({args.size}), adam, k={args.k}, {jax.default_backend()}; '
           f'{args.rounds} rounds x {args.reps} steps, interleaved.', '',
           '| step | median ms | round medians p25-p75 ms | peak MiB | '
           'temporaries MiB |', '|---|---|---|---|---|']
  for row in rows:
    lines.append(
        f"| {row['name']} | {row['median_ms']:.1f} | {row['p25_ms']:.1f}-"
        f"{row['p75_ms']:.1f} | {row['peak_bytes'] / 2**20:.2f} | "
        f"{row['temp_bytes'] / 2**20:.2f} |")
  text = '\n'.join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'unroll.json'), 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(args.out, 'unroll.md'), 'w') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  main()
