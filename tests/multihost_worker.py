"""One process of a 2-process, 8-device CPU run of accumulated adam steps.

``python tests/multihost_worker.py PROCESS_ID PORT OUT_JSON``. Spawned twice
by ``tests/test_multihost.py``; the processes meet at ``127.0.0.1:PORT``
(``jax.distributed``, gloo collectives), each with 4 CPU devices. Each process
loads only its own rows of the global batch and builds the global array with
``jax.make_array_from_process_local_data``, as a data loader on a pod slice
or a multi-GPU cluster does. Process 0 writes the final parameters.
"""

import json
import os
import sys

if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import accum_jax  # noqa: E402
from accum_jax import _compat  # noqa: E402

B, K, STEPS, LR = 64, 4, 3, 1e-2


def make_params():
  rng = np.random.RandomState(0)
  return {'w1': (rng.randn(16, 32) * 0.3).astype(np.float32),
          'b1': np.zeros(32, np.float32),
          'w2': (rng.randn(32, 8) * 0.3).astype(np.float32)}


def make_batch(step):
  """The global batch of ``step`` (every process could make it; each slices)."""
  rng = np.random.RandomState(100 + step)
  return {'x': rng.randn(B, 16).astype(np.float32),
          'y': rng.randn(B, 8).astype(np.float32)}


def loss_fn(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - batch['y']) ** 2)


def main(process_id, port, out):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=2, process_id=process_id,
                             initialization_timeout=60)
  try:
    mesh = _compat.make_mesh((jax.device_count(),), ('data',))
    tx = accum_jax.accumulate(optax.adam(LR), K)

    @jax.jit
    def step(params, opt_state, batch):
      loss, updates, opt_state = accum_jax.value_and_update(loss_fn, tx)(
          params, opt_state, batch)
      return optax.apply_updates(params, updates), opt_state, loss

    rows = NamedSharding(mesh, P('data'))
    # The rows this process's devices hold: its slice of the global batch.
    index = rows.addressable_devices_indices_map((B, 16)).values()
    start = min(i[0].start for i in index)
    stop = max(i[0].stop for i in index)
    with _compat.set_mesh(mesh):
      params = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              NamedSharding(mesh, P()), x), make_params())
      opt_state = jax.jit(tx.init)(params)
      losses = []
      for i in range(STEPS):
        local = jax.tree.map(lambda x: x[start:stop], make_batch(i))
        batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                rows, x, (B,) + x.shape[1:]), local)
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    result = {'params': {k: np.asarray(v.addressable_data(0)).tolist()
                         for k, v in params.items()},
              'losses': losses, 'rows': [start, stop],
              'devices': jax.device_count(),
              'local_devices': jax.local_device_count()}
    with open(f'{out}.{process_id}', 'w') as f:
      json.dump(result, f)
  finally:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
