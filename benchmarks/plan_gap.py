"""How far a compile-only plan is from the memory a real device uses.

Run on a machine with the accelerator (here: a GPU; TPUs report the same
statistics), after ``pip install -e ".[gpu-plan]"``::

  python -m benchmarks.plan_gap --target h100 --k 4

It compiles ``examples/plan_for_target.py``'s language model (smaller by
default: 4 layers, width 1024) three ways and prints, per device:

* ``planned``: the peak ``plan_microbatches(target=...)`` reports for the
  compile-only target (argument + output + temporaries - aliased);
* ``compiled here``: the same figure for the real device, from its own
  compile (a different number means the target's description differs from
  the device);
* ``measured``: ``peak_bytes_in_use`` from ``device.memory_stats()`` after
  one step on real arrays, in a fresh process: what the allocator held,
  fragmentation and the runtime's own buffers included;

and ``bytes_limit`` (what the allocator may use) against the target's
budget. The gap ``measured / planned`` is what the headroom must cover. On a
machine without an accelerator it prints the planned figure only.
"""

import argparse
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import accum_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _example():
  spec = importlib.util.spec_from_file_location(
      'plan_for_target', ROOT / 'examples' / 'plan_for_target.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', default='h100')
  parser.add_argument('--k', type=int, default=4)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--seq', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=16)
  args = parser.parse_args(argv)
  lm = _example()
  params = lm.lm_params(args.layers, args.dim, args.vocab, args.seq)
  opt_state = jax.eval_shape(
      accum_jax.accumulate(lm.optimizer(), 1, cross_step=False).init, params)
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens}
  step = lm.make_step_factory(args.heads)(args.k, None)
  target = accum_jax.load_target(args.target)
  plan = accum_jax.plan_microbatches(
      lm.make_step_factory(args.heads), params, opt_state, batch,
      batch_argnum=2, donate_argnums=(0, 1), target=target,
      num_microbatches=[args.k], remat=(None,), budget_bytes=2**62,
      print_fn=None)
  mib = lambda n: f'{n / 2**20:,.1f} MiB'  # noqa: E731
  print(f'{target.describe()}\nplanned:        {mib(plan.peak_bytes)}')
  device = jax.devices()[0]
  if device.platform == 'cpu':
    print('no accelerator here: nothing to measure')
    return {'planned': plan.peak_bytes}
  here = accum_jax.compiled_memory(step, params, opt_state, batch,
                                   donate_argnums=(0, 1))
  real = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      (params, opt_state, batch))
  out = jax.jit(step, donate_argnums=(0, 1))(*real)
  jax.block_until_ready(out)
  stats = device.memory_stats()
  measured, limit = stats['peak_bytes_in_use'], stats['bytes_limit']
  print(f'compiled here:  {mib(here.peak_bytes)} ({device.device_kind})\n'
        f'measured:       {mib(measured)} (peak_bytes_in_use; '
        f'{measured / plan.peak_bytes:.3f} x planned)\n'
        f'bytes_limit:    {mib(limit)} against a budget of '
        f'{mib(target.budget_bytes)} '
        f'(XLA_PYTHON_CLIENT_MEM_FRACTION='
        f'{os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset")})')
  return {'planned': plan.peak_bytes, 'compiled': here.peak_bytes,
          'measured': int(measured), 'bytes_limit': int(limit),
          'ratio': float(np.float64(measured) / plan.peak_bytes)}


if __name__ == '__main__':
  main()
