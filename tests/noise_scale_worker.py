"""The noise scale on an 8-device CPU mesh; prints JSON.

Spawned by ``tests/test_noise_scale.py`` (the device count must be set before
jax starts). On a mesh a piece of the estimator is one device's share of a
micro-batch, so the mesh's estimate (``got``) must equal one device's run
with ``8 k`` micro-batches whose strided split makes the same pieces
(``want``). The collectives of each compiled step are counted inside and
outside the micro-batch loop, with and without tracking.
"""

import json
import os

if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import accum_jax  # noqa: E402
from accum_jax import _compat  # noqa: E402
from benchmarks import hlo as _hlo  # noqa: E402

DEVICES, K, ROWS = 8, 4, 4  # 4 rows per device per micro-batch
B = DEVICES * K * ROWS


def loss_fn(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'])
  r = jnp.sum((h @ params['w2'] - batch['y']) ** 2, -1)
  m = batch['mask']
  return 0.5 * jnp.sum(m * r) / jnp.maximum(jnp.sum(m), 1.0)


def real_rows(batch):
  return jnp.sum(batch['mask'])


def make(seed):
  rng = np.random.default_rng(seed)
  params = {'w1': jnp.asarray(rng.normal(size=(8, 16)) / 3, jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(16, 2)) / 4, jnp.float32)}
  batches = []
  for _ in range(3):
    mask = (rng.random(B) < 0.7).astype(np.float32)
    batches.append({'x': rng.normal(size=(B, 8)).astype(np.float32),
                    'y': rng.normal(size=(B, 2)).astype(np.float32),
                    'mask': mask})
  return params, batches


def as_one_device(batch):
  """Rows reordered so that micro-batch ``d K + j`` of ``DEVICES K`` is device
  ``d``'s micro-batch ``j`` on the mesh (its rows ``j, j + K, ...`` of the
  device's block)."""
  order = np.empty(B, np.int64)
  for i in range(ROWS):
    for d in range(DEVICES):
      for j in range(K):
        order[i * DEVICES * K + d * K + j] = d * (B // DEVICES) + i * K + j
  return {name: x[order] for name, x in batch.items()}


def estimate(mesh, params, batches, weighted, pspec=None, **options):
  weight_fn = real_rows if weighted else None
  pspec = P() if pspec is None else pspec
  out = {}
  for track in (True, False):
    tx = accum_jax.accumulate(optax.sgd(0.0), K, track_noise_scale=track,
                              noise_scale_decay=0.5)
    step = jax.jit(accum_jax.value_and_update(loss_fn, tx,
                                              weight_fn=weight_fn, **options))
    with _compat.set_mesh(mesh):
      ps = jax.tree.map(
          lambda x: jax.device_put(x, NamedSharding(mesh, pspec)), params)
      state = jax.jit(tx.init)(ps)
      bs = [jax.tree.map(
          lambda x: jax.device_put(x, NamedSharding(mesh, P('data'))), b)
            for b in batches]
      compiled = step.lower(ps, state, bs[0]).compile()
      out['counts' if track else 'counts_off'] = _hlo.count_collectives(
          compiled, mesh, 'data')
      if track:
        for b in bs:
          state = step(ps, state, b)[2]
        out['got'] = np.asarray(accum_jax.noise_scale(state)[:3],
                                np.float64).tolist()
  tx = accum_jax.accumulate(optax.sgd(0.0), DEVICES * K,
                            track_noise_scale=True, noise_scale_decay=0.5)
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx, weight_fn=weight_fn))
  state = tx.init(params)
  for b in batches:
    state = step(params, state, as_one_device(b))[2]
  out['want'] = np.asarray(accum_jax.noise_scale(state)[:3],
                           np.float64).tolist()
  return out


def main():
  mesh = _compat.make_mesh((DEVICES,), ('data',))
  params, batches = make(0)
  combines = _hlo.combines_all_reduces(mesh, 'data')
  unmasked = [dict(b, mask=np.ones_like(b['mask'])) for b in batches]
  out = {
      'rows': estimate(mesh, params, unmasked, weighted=False),
      'weighted': estimate(mesh, params, batches, weighted=True),
      'fsdp_per_step': estimate(mesh, params, batches, weighted=True,
                                pspec=P('data'), fsdp_reduce='per_step'),
  }
  try:
    estimate(mesh, params, batches, weighted=True, pspec=P('data'))
    out['fsdp_error'] = ''
  except ValueError as e:
    out['fsdp_error'] = str(e)
  out['combines_all_reduces'] = combines
  print(json.dumps(out))


if __name__ == '__main__':
  main()
