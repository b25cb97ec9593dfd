"""Runs the benchmark grid and writes JSON, a markdown table and PNG plots.

  python -m benchmarks.run                # default CPU run, a few minutes
  python -m benchmarks.run --quick        # CI smoke run
  python -m benchmarks.run --size large   # the core issue's MLP; GPU/TPU

For every model, dtype and ``k``, every contender (see
:mod:`benchmarks.contenders`) is compiled ahead with the params and optimizer
state donated; its peak memory is :func:`accum_jax.compiled_memory` of that
executable (argument + output + temporaries - aliased), the same figure
:func:`accum_jax.plan_microbatches` plans with. The contenders of a cell are
then timed interleaved (one optimizer step each, in a rotating order), so
machine noise hits them alike; the table reports the median step time, its
spread (25th-75th percentile) and the ratios to the hand-written scan. On a
backend whose allocator reports ``peak_bytes_in_use`` (GPU, TPU), each
contender is also run alone in a child process to read the allocator's peak.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accum_jax
from benchmarks import contenders as contenders_lib
from benchmarks import models as models_lib
from benchmarks import report

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
REFERENCE = 'scan'


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.run', description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', default=os.path.join('benchmarks', 'results'),
                 help='output folder (default: %(default)s)')
  p.add_argument('--quick', action='store_true',
                 help='CI smoke run: tiny sizes, k in {1, 4}, float32, 2 reps')
  p.add_argument('--size', choices=sorted(models_lib.SIZES), default='small',
                 help='model and batch sizes (default: %(default)s)')
  p.add_argument('--models', default='mlp,lm,cnn')
  p.add_argument('--dtypes', default='float32',
                 help='comma-separated: float32,bfloat16 (default: %(default)s)')
  p.add_argument('--ks', default='1,2,4,8,16')
  p.add_argument('--contenders', default=','.join(contenders_lib.DEFAULT),
                 help='comma-separated (default: %(default)s), from: '
                 + ','.join(contenders_lib.CONTENDERS))
  p.add_argument('--jobs', type=int, default=os.cpu_count() or 1,
                 help='contenders compiled at once (default: %(default)s)')
  p.add_argument('--reps', type=int, default=5,
                 help='timed optimizer steps per contender and cell (0: '
                 'compile and measure memory only)')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--learning-rate', type=float, default=1e-3)
  p.add_argument('--allocator-peak', choices=('auto', 'on', 'off'),
                 default='auto',
                 help='read peak_bytes_in_use in a child process per '
                 'contender (auto: when the backend reports it)')
  p.add_argument('--plan-budget-mib', type=float, default=None,
                 help='budget of the planner demo (default: half the LM '
                 "step's peak at k=1)")
  p.add_argument('--no-plots', action='store_true')
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  if p.parse_args(argv).quick:  # new defaults; explicit flags still win
    p.set_defaults(size='tiny', ks='1,4', dtypes='float32', reps=2)
  args = p.parse_args(argv)
  args.models = args.models.split(',')
  args.dtypes = args.dtypes.split(',')
  args.ks = [int(k) for k in args.ks.split(',')]
  args.contenders = args.contenders.split(',')
  for name in args.contenders:
    if name not in contenders_lib.CONTENDERS:
      p.error(f'unknown contender {name!r}; choose from '
              f'{list(contenders_lib.CONTENDERS)}')
  for name in args.models:
    if name not in models_lib.BUILDERS:
      p.error(f'unknown model {name!r}; choose from '
              f'{list(models_lib.BUILDERS)}')
  for name in args.dtypes:
    if name not in DTYPES:
      p.error(f'unknown dtype {name!r}; choose from {list(DTYPES)}')
  return args


def environment() -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'optax': optax.__version__,
      'flax': flax.__version__,
      'accum_jax': accum_jax.__version__,
      'python': platform.python_version(),
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'machine': platform.platform(),
      'date_utc': time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime()),
  }


def microbatches(batch, k):
  """The ``k`` strided micro-batches fed to the cross-step contenders."""
  split = accum_jax.split_batch(batch, k)
  return [jax.tree.map(lambda x, j=j: x[j], split) for j in range(k)]


class Cell:
  """One contender on one model, dtype and k: compiled, measured, runnable."""

  def __init__(self, key, model, inner, k):
    self.key = key
    c = contenders_lib.CONTENDERS[key](model, inner, k)
    self.name, self.cross_step = c.name, c.cross_step
    self.k = k
    rng = jax.random.key(1)
    if c.cross_step:
      self.inputs = microbatches(model.batch, k)
      self.rngs = [jax.random.fold_in(rng, j) for j in range(k)]
    else:
      self.inputs, self.rngs = [model.batch], [rng]
    self.carry = jax.tree.map(jnp.copy, (model.params, c.opt_state,
                                         model.state))
    start = time.perf_counter()
    self.compiled = jax.jit(c.step, donate_argnums=contenders_lib.DONATE).lower(
        *self.carry, self.inputs[0], self.rngs[0]).compile()
    self.compile_seconds = time.perf_counter() - start
    self.memory = accum_jax.compiled_memory(self.compiled)
    self.times = []
    self.loss = None

  def step(self):
    """One optimizer step: one call in-step, ``k`` calls cross-step."""
    params, opt_state, state = self.carry
    for batch, rng in zip(self.inputs, self.rngs, strict=True):
      params, opt_state, state, loss = self.compiled(params, opt_state, state,
                                                     batch, rng)
    jax.block_until_ready((params, opt_state, state, loss))
    self.carry = (params, opt_state, state)
    self.loss = float(loss)

  def release(self):
    self.carry = self.inputs = self.compiled = None


def time_cells(cells, reps, warmup):
  """Interleaved timing: every rep runs each cell once, in a rotating order."""
  for rep in range(warmup + reps):
    order = cells[rep % len(cells):] + cells[:rep % len(cells)]
    for cell in order:
      start = time.perf_counter()
      cell.step()
      if rep >= warmup:
        cell.times.append(time.perf_counter() - start)


def allocator_peak(args, model_name, dtype_name, k, key):
  """``peak_bytes_in_use`` of one contender run alone in a child process."""
  spec = json.dumps(dict(model=model_name, dtype=dtype_name, k=k, key=key))
  cmd = [sys.executable, '-m', 'benchmarks.run', '--child', spec,
         '--size', args.size, '--learning-rate', str(args.learning_rate)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    print(out.stderr[-2000:], file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])['peak_bytes_in_use']


def run_child(args):
  spec = json.loads(args.child)
  model = models_lib.make(spec['model'], args.size, DTYPES[spec['dtype']])
  cell = Cell(spec['key'], model, optax.adam(args.learning_rate), spec['k'])
  cell.step()
  cell.step()
  stats = jax.devices()[0].memory_stats() or {}
  print(json.dumps({'peak_bytes_in_use': stats.get('peak_bytes_in_use')}))


def percentile(xs, q):
  return float(np.percentile(np.asarray(xs), q))


def run_grid(args, env):
  rows = []
  use_alloc = args.allocator_peak == 'on' or (
      args.allocator_peak == 'auto'
      and 'peak_bytes_in_use' in (jax.devices()[0].memory_stats() or {}))
  inner = optax.adam(args.learning_rate)
  for model_name in args.models:
    for dtype_name in args.dtypes:
      model = models_lib.make(model_name, args.size, DTYPES[dtype_name])
      batch_size = jax.tree.leaves(model.batch)[0].shape[0]
      full = None  # the full-batch step does not depend on k: compile once
      for k in args.ks:
        if batch_size % k:
          print(f'skip {model.name} k={k}: batch {batch_size} not divisible')
          continue
        if 'full' in args.contenders and full is None:
          full = Cell('full', model, inner, k)
        keys = [key for key in args.contenders if key != 'full']
        with futures.ThreadPoolExecutor(args.jobs) as pool:  # XLA drops the GIL
          n = len(keys)
          built = dict(zip(keys, pool.map(Cell, keys, [model] * n,
                                          [inner] * n, [k] * n), strict=True))
        cells = [full if key == 'full' else built[key]
                 for key in args.contenders]
        if full is not None:
          full.times = []
        if args.reps:
          time_cells(cells, args.reps, args.warmup)
        ref = next((c for c in cells if c.key == REFERENCE), None)
        ref_time = statistics.median(ref.times) if ref and ref.times else None
        ref_peak = ref.memory.peak_bytes if ref else None
        for cell in cells:
          times = cell.times or [float('nan')]  # --reps 0: memory only
          median = statistics.median(times)
          row = {
              'model': model.name, 'model_kind': model_name,
              'dtype': dtype_name, 'batch_size': batch_size, 'k': k,
              'contender': cell.key, 'contender_name': cell.name,
              'cross_step': cell.cross_step,
              'param_bytes': model.param_bytes,
              'median_s': median, 'p25_s': percentile(times, 25),
              'p75_s': percentile(times, 75), 'min_s': min(times),
              'times_s': cell.times,
              'time_vs_scan': median / ref_time if ref_time else None,
              'peak_bytes': cell.memory.peak_bytes,
              'argument_bytes': cell.memory.argument_bytes,
              'output_bytes': cell.memory.output_bytes,
              'temp_bytes': cell.memory.temp_bytes,
              'alias_bytes': cell.memory.alias_bytes,
              'flops': cell.memory.flops,
              'memory_vs_scan': (cell.memory.peak_bytes / ref_peak
                                 if ref_peak else None),
              'compile_s': cell.compile_seconds,
              'final_loss': cell.loss,
              'allocator_peak_bytes': None,
          }
          rows.append(row)
          if cell is not full:
            cell.release()
        if use_alloc:
          for row in rows[-len(cells):]:
            row['allocator_peak_bytes'] = allocator_peak(
                args, model_name, dtype_name, k, row['contender'])
        line = ', '.join(
            f'{r["contender"]} {r["median_s"] * 1e3:.1f}ms '
            f'{r["peak_bytes"] / 2**20:.2f}MiB' for r in rows[-len(cells):])
        print(f'{model.name} {dtype_name} k={k}: {line}', flush=True)
  return rows


def run_plan(args):
  """The planner on the LM: the fewest micro-batches that fit a budget."""
  model = models_lib.make('lm', args.size, jnp.float32)
  inner = optax.adam(args.learning_rate)
  make_step = contenders_lib.make_accum_step(model, inner)
  opt_state = accum_jax.accumulate(inner, 1).init(model.params)
  example = (model.params, opt_state, model.state, model.batch,
             jax.random.key(1))
  if args.plan_budget_mib is None:
    full = accum_jax.compiled_memory(make_step(1, None), *example,
                                     donate_argnums=contenders_lib.DONATE)
    budget = full.peak_bytes // 2
  else:
    budget = int(args.plan_budget_mib * 2**20)
  lines = []
  plan = accum_jax.plan_microbatches(
      make_step, *example, batch_argnum=3,
      donate_argnums=contenders_lib.DONATE, budget_bytes=budget,
      remat=(None, models_lib.REMAT_POLICY, True), print_fn=lines.append)
  print(lines[0])
  return {
      'model': model.name, 'budget_bytes': budget,
      'num_microbatches': plan.num_microbatches,
      'remat': accum_jax._planner.remat_name(plan.remat),  # pylint: disable=protected-access
      'peak_bytes': plan.peak_bytes, 'table': plan.table(),
      'candidates': [
          {'k': c.num_microbatches,
           'remat': accum_jax._planner.remat_name(c.remat),  # pylint: disable=protected-access
           'peak_bytes': c.peak_bytes, 'flops': c.flops, 'fits': c.fits}
          for c in plan.candidates],
  }


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    run_child(args)
    return
  start = time.perf_counter()
  env = environment()
  print(f'accum_jax benchmarks on {env["backend"]} ({env["device_kind"]}), '
        f'jax {env["jax"]}, optax {env["optax"]}', flush=True)
  rows = run_grid(args, env)
  plan = run_plan(args) if 'lm' in args.models else None
  env['wall_s'] = time.perf_counter() - start
  config = {k: v for k, v in vars(args).items() if k != 'child'}
  result = {'environment': env, 'config': config, 'rows': rows,
            'plan': plan}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(report.markdown(result))
  if not args.no_plots:
    report.plots(result, args.out)
  print(report.targets(result))
  print(f'wrote {args.out} in {env["wall_s"]:.0f}s')


if __name__ == '__main__':
  main()
