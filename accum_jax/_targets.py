"""Compile-only devices of the accelerators a step will run on.

JAX's ahead-of-time API compiles for devices that are described, not present:
``jax.jit(f).lower(*structs).compile()`` on "compile-only" devices gives the
accelerator compiler's own ``memory_analysis()`` and optimized HLO on a
machine without one. :func:`devices` makes them from a target name:

* ``'tpu:<topology>'``, e.g. ``'tpu:v5e:2x4'``, ``'tpu:v4:2x2x1'``,
  ``'tpu:v5p:2x2x1'``, ``'tpu:v6e:2x2'``: XLA:TPU, from libtpu
  (``pip install "jax[tpu]"``);
* ``'h100'``, ``'h100:<n>'``: ``n`` (default 1) H100 80GB GPUs of one host,
  XLA:GPU, from the CUDA plugin (``pip install "jax[cuda12]"``);
* ``'cpu'``, ``'cpu:<n>'``: this machine's XLA:CPU devices (``n`` of them,
  which needs ``--xla_force_host_platform_device_count`` set before jax is
  imported).

Nothing compiled for a compile-only device can run: memory, HLO and flops
only.
"""

import os
from typing import Any

import jax

# The device description XLA:GPU compiles for (a GpuTargetConfig text proto),
# from the published H100 SXM 80GB figures.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

GPUS = {'h100': H100}


def _count(rest: str, target: str) -> int:
  try:
    n = int(rest or 1)
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f'target {target!r}: the device count after ":" must be '
                     f'a positive integer, got {rest!r}.')
  return n


def devices(target: str) -> list[Any]:
  """The devices of ``target`` (see the module docstring), in mesh order.

  Raises:
    ValueError: an unknown target name.
    RuntimeError: the target's compiler is not installed, naming the pip
      extra that brings it.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  kind, _, rest = target.partition(':')
  if kind == 'cpu':
    n = _count(rest, target)
    found = jax.devices('cpu')
    if len(found) < n:
      raise RuntimeError(
          f'target {target!r} needs {n} CPU devices, jax has {len(found)}: set '
          f'XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax '
          'is imported.')
    return found[:n]
  if kind == 'tpu':
    try:
      topology = topologies.get_topology_desc(platform='tpu',
                                              topology_name=rest)
    except Exception as e:  # noqa: BLE001 - libtpu's errors vary by version
      raise RuntimeError(
          f'target {target!r}: XLA:TPU could not describe topology {rest!r} '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}).'
          ' The TPU compiler comes with libtpu: pip install "jax[tpu]" '
          '(same version as jax). Topologies look like v5e:2x4, v4:2x2x1.'
      ) from e
    return list(topology.devices)
  if kind in GPUS:
    n = _count(rest, target)
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
    try:
      topology = topologies.get_topology_desc(
          platform='cuda', target_config=GPUS[kind], topology=f'1x1x{n}')
    except Exception as e:  # noqa: BLE001
      raise RuntimeError(
          f'target {target!r}: XLA:GPU is not available '
          f'({type(e).__name__}). The GPU compiler comes with the CUDA '
          'plugin: pip install "jax[cuda12]" (same version as jax).'
      ) from e
    return list(topology.devices)
  raise ValueError(
      f'Unknown target {target!r}: use "tpu:<topology>" (e.g. tpu:v5e:2x4), '
      f'{", ".join(f"{g!r} or {g}:<n>" for g in GPUS)}, or "cpu:<n>".')
