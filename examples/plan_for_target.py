"""Will this step fit on the accelerator I am about to rent, and at which k?

A ~1B-parameter GPT-style language model (16 layers, width 2048, vocabulary
32k, sequences of 1024 tokens; 0.94B float32 parameters, bfloat16 compute,
adamw) is planned on this machine for hardware it does not have. The
accelerator's own compiler (libtpu for TPUs, the CUDA plugin for GPUs)
compiles the train step for compile-only devices of the named target;
``accum_jax.plan_microbatches`` reads the per-device peak of each candidate
``k`` and remat option and picks the fewest micro-batches that fit the
device's memory less its headroom. Nothing runs on a device.

Usage (each target's compiler in its extra)::

  pip install -e ".[tpu-plan]"
  python examples/plan_for_target.py --target tpu:v5e:2x4 --layout fsdp
  pip install -e ".[gpu-plan]"
  python examples/plan_for_target.py --target l4 --layout one

``--layout`` is ``one`` (one device), ``dp`` (data parallel, parameters
replicated) or ``fsdp`` (parameters and optimizer state sharded over the
data axis, gathered one layer at a time inside the layer scan). The layers
are a ``lax.scan`` over stacked weights, so a compile takes about as long for
16 layers as for 2; ``remat`` puts ``jax.checkpoint`` around each layer.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import accum_jax


def lm_params(layers, dim, vocab, seq):
  """The parameters' shapes: stacked layers, untied embedding and head."""
  f32 = jnp.float32
  s = lambda *shape: jax.ShapeDtypeStruct(shape, f32)  # noqa: E731
  return {'embed': s(vocab, dim), 'pos': s(seq, dim), 'head': s(dim, vocab),
          'ln_f': s(dim),
          'layers': {'ln1': s(layers, dim), 'qkv': s(layers, dim, 3 * dim),
                     'out': s(layers, dim, dim), 'ln2': s(layers, dim),
                     'up': s(layers, dim, 4 * dim),
                     'down': s(layers, 4 * dim, dim)}}


def _explicit(x):
  mesh = jax.typeof(x).sharding.mesh
  return AxisType.Explicit in getattr(mesh, 'axis_types', ())


def _whole(w):
  """A parameter whole on every device: FSDP's all-gather, said explicitly
  on an Explicit mesh."""
  return jax.sharding.reshard(w, P()) if _explicit(w) else w


def _norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)
  return (x32 * scale).astype(x.dtype)


def make_loss(heads, remat):
  """The mean next-token loss, ``remat`` around each layer (``None``: no
  recomputation, ``True``: recompute the whole layer in the backward pass,
  or a ``jax.checkpoint_policies`` policy)."""

  def layer(x, w):
    w = jax.tree.map(lambda a: _whole(a).astype(jnp.bfloat16), w)
    b, t, d = x.shape
    h = _norm(x, w['ln1'])
    q, k, v = (z.reshape(b, t, heads, d // heads)
               for z in jnp.split(h @ w['qkv'], 3, -1))
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s / np.sqrt(d // heads),
                  -1e9)
    a = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s).astype(x.dtype), v)
    x = x + a.reshape(b, t, d) @ w['out']
    return x + jax.nn.gelu(_norm(x, w['ln2']) @ w['up']) @ w['down'], None

  if remat is not None and remat is not False:
    policy = None if remat is True else remat
    layer = jax.checkpoint(layer, policy=policy)

  def loss_fn(params, batch):
    ids = batch['inputs']
    embed = _whole(params['embed']).astype(jnp.bfloat16)
    if _explicit(ids):
      x = embed.at[ids].get(out_sharding=jax.typeof(ids).sharding)
    else:
      x = embed[ids]
    x = x + _whole(params['pos']).astype(jnp.bfloat16)[:ids.shape[1]]
    x, _ = jax.lax.scan(layer, x, params['layers'])
    x = _norm(x, _whole(params['ln_f']))
    logits = (x @ _whole(params['head']).astype(jnp.bfloat16))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['targets']))

  return loss_fn


def optimizer():
  return optax.adamw(3e-4, weight_decay=0.1)


def make_step_factory(heads):
  def make_step(k, remat):
    tx = accum_jax.accumulate(optimizer(), k, cross_step=False)
    grad_step = accum_jax.value_and_update(make_loss(heads, remat), tx)

    def step(params, opt_state, batch):
      loss, updates, opt_state = grad_step(params, opt_state, batch)
      return optax.apply_updates(params, updates), opt_state, loss

    return step

  return make_step


def fsdp_spec(leaf):
  """Shard a parameter's largest axis over 'data' (FSDP); scalars, vectors
  and the optimizer's counts stay replicated."""
  if leaf.ndim < 2:
    return P()
  axis = int(np.argmax(leaf.shape))
  return P(*[('data' if i == axis else None) for i in range(leaf.ndim)])


def remat_label(remat):
  return {None: 'none', True: 'full (each layer)'}.get(remat, str(remat))


def size(n):
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.2f} MiB'


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', default='tpu:v5e:2x4')
  parser.add_argument('--layout', choices=('one', 'dp', 'fsdp'),
                      default='fsdp')
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--dim', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--seq', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=64,
                      help='sequences per step, over all devices')
  parser.add_argument('--k', type=int, nargs='*', default=None,
                      help='the k to try (default: every divisor)')
  parser.add_argument('--budget-mib', type=float, default=None,
                      help="default: the target's memory less its headroom")
  parser.add_argument('--search', choices=('bisect', 'all'),
                      default='bisect')
  args = parser.parse_args(argv)

  target = accum_jax.load_target(args.target)
  params = lm_params(args.layers, args.dim, args.vocab, args.seq)
  opt_state = jax.eval_shape(
      accum_jax.accumulate(optimizer(), 1, cross_step=False).init, params)
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens}
  layout = {'one': {}, 'dp': {'mesh_axes': ('data',)},
            'fsdp': {'mesh_axes': ('data',),
                     'in_specs': (fsdp_spec, fsdp_spec, None)}}[args.layout]
  if args.layout == 'one':
    target = target._replace(devices=target.devices[:1])
  budget = None if args.budget_mib is None else int(args.budget_mib * 2**20)
  print(f'{count(params) / 1e9:.2f}B parameters, {args.batch} x {args.seq} '
        f'tokens per step, adamw; {target.describe(budget)}, layout '
        f'{args.layout}')
  start = time.perf_counter()
  try:
    plan = accum_jax.plan_microbatches(
        make_step_factory(args.heads), params, opt_state, batch,
        batch_argnum=2, donate_argnums=(0, 1), target=target,
        num_microbatches=args.k, remat=(None, True), budget_bytes=budget,
        search=args.search, print_fn=None, **layout)
  except accum_jax.PlanDoesNotFit as e:
    print(e)
    smallest = e.smallest
    print(f'\nDoes not fit on {target.name} ({args.layout}) at any k: the '
          f'smallest is k={smallest.num_microbatches}, remat '
          f'{remat_label(smallest.remat)}, at '
          f'{size(smallest.peak_bytes)} per device, against '
          f'{size(e.budget_bytes)} '
          f'({time.perf_counter() - start:.0f} s of compiling).')
    return None
  print(plan)
  print(f'\nFits on {target.name} ({args.layout}) at k={plan.num_microbatches}'
        f' with remat {remat_label(plan.remat)}: '
        f'{size(plan.peak_bytes)} per device of '
        f'{size(plan.budget_bytes)} '
        f'({time.perf_counter() - start:.0f} s of compiling).')
  return plan


if __name__ == '__main__':
  main()
