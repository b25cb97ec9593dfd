"""A small train step planned for a target: shared by the XLA:CPU tests
(``tests/test_targets.py``) and the compile-only ones (``tests/test_aot.py``).

Every figure is checked against ``memory_analysis()`` of the same step
compiled directly for the same devices, independently of the planner.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import accum_jax
from accum_jax import _compat

DONATE = (0, 1)


def loss_fn(params, batch):
  h = batch
  for w in params:
    h = jnp.tanh(h @ w)
  return jnp.mean(h ** 2)


def make_step(k, remat):
  tx = accum_jax.accumulate(optax.adam(1e-3), k, cross_step=False)
  grad_step = accum_jax.value_and_update(loss_fn, tx, remat=remat)

  def step(params, opt_state, batch):
    loss, updates, opt_state = grad_step(params, opt_state, batch)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def example(width=256, depth=4, batch=16384):
  params = [jax.ShapeDtypeStruct((width, width), jnp.float32)] * depth
  opt_state = jax.eval_shape(
      accum_jax.accumulate(optax.adam(1e-3), 1, cross_step=False).init,
      params)
  return params, opt_state, jax.ShapeDtypeStruct((batch, width), jnp.float32)


def fsdp(leaf):
  """Shard a leaf's first axis over 'data' where it divides, as FSDP does."""
  return P('data') if leaf.ndim and leaf.shape[0] % 8 == 0 else P()


def model_parallel(leaf):
  """Shard a matrix's columns over 'model' (the 2-D layout's second axis)."""
  return P(None, 'model') if leaf.ndim == 2 else P()


def mesh_2d(target):
  return _compat.make_mesh((len(target.devices) // 2, 2), ('data', 'model'),
                           devices=target.devices)


def direct_peak(target, step, args, layout):
  """The step compiled straight for ``target`` on a 1-D 'data' mesh
  (``layout``: 'one device', 'dp' or 'fsdp') or a 2-D ('data', 'model')
  one ('2d'); XLA's own peak."""
  if layout == 'one device':
    s = jax.sharding.SingleDeviceSharding(target.devices[0])
    placed = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args)
    mesh = None
  else:
    if layout == '2d':
      mesh, rule = mesh_2d(target), model_parallel
    else:
      mesh = _compat.make_mesh((len(target.devices),), ('data',),
                               devices=target.devices)
      rule = fsdp if layout == 'fsdp' else (lambda _: P())
    params, opt_state, batch = args
    placed = (*jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, rule(x))),
        (params, opt_state)),
              jax.ShapeDtypeStruct(batch.shape, batch.dtype,
                                   sharding=NamedSharding(mesh, P('data'))))
  lower = jax.jit(step, donate_argnums=DONATE).lower
  if mesh is None:
    compiled = lower(*placed).compile()
  else:
    with _compat.set_mesh(mesh):
      compiled = lower(*placed).compile()
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def plan(target, args, layout, **kw):
  specs = {'one device': {}, 'dp': dict(mesh_axes=('data',)),
           'fsdp': dict(mesh_axes=('data',), in_specs=(fsdp, fsdp, None))}
  if layout == '2d':
    specs['2d'] = dict(mesh=mesh_2d(accum_jax.load_target(target)),
                       mesh_axes=('data',),
                       in_specs=(model_parallel, model_parallel, None))
  return accum_jax.plan_microbatches(
      make_step, *args, batch_argnum=2, donate_argnums=DONATE, target=target,
      print_fn=None, **specs[layout], **kw)


def check_plans(target, layouts=('one device', 'dp', 'fsdp'), ks=(1, 2, 4, 8)):
  """For each layout: every k compiled (exhaustively) straight for
  ``target``; the planner's peaks equal them, and with a budget between two
  peaks it picks the smallest k that fits. Returns the peaks by layout."""
  target = accum_jax.load_target(target)
  args = example()
  found = {}
  for layout in layouts:
    peaks = {k: direct_peak(target, make_step(k, None), args, layout)
             for k in ks}
    found[layout] = peaks
    everything = plan(target, args, layout, num_microbatches=ks,
                      remat=(None,), budget_bytes=max(peaks.values()))
    assert everything.target.startswith(target.name)
    for c in everything.candidates:
      assert c.peak_bytes == peaks[c.num_microbatches], (layout, c)
    # A budget at each peak: the exhaustive answer is the smallest k whose
    # peak fits. search='all' finds it always; the bisection where the peak
    # falls with k, and otherwise a k that fits whose compiled smaller
    # neighbour does not.
    monotone = all(peaks[a] >= peaks[b] for a, b in zip(ks, ks[1:]))
    for budget in sorted(set(peaks.values())):
      smallest = min(k for k in ks if peaks[k] <= budget)
      exact = plan(target, args, layout, num_microbatches=ks, remat=(None,),
                   budget_bytes=budget, search='all')
      assert exact.num_microbatches == smallest, (layout, peaks, budget)
      assert not exact.skipped
      bisected = plan(target, args, layout, num_microbatches=ks,
                      remat=(None,), budget_bytes=budget)
      k = bisected.num_microbatches
      assert peaks[k] <= budget
      if monotone:
        assert k == smallest, (layout, peaks, budget)
      elif k != ks[0]:
        below = ks[ks.index(k) - 1]
        assert below not in bisected.skipped and peaks[below] > budget
  return found
