"""The accelerators a step will run on, described for their compilers.

JAX's ahead-of-time API compiles for devices that are described, not present:
``jax.jit(f).lower(*structs).compile()`` on "compile-only" devices gives the
accelerator compiler's own ``memory_analysis()`` and optimized HLO on a
machine without one. :func:`load_target` makes a :class:`Target` (those
devices, and the memory each has) from a name:

* ``'tpu:<topology>'``, e.g. ``'tpu:v5e:2x4'`` (a v5e-8), ``'tpu:v5e:1x1'``
  (one chip), ``'tpu:v4:2x2x1'``,
  ``'tpu:v5p:2x2x1'``, ``'tpu:v6e:2x2'``, pods such as ``'tpu:v5e:16x16'``:
  XLA:TPU, from libtpu (``pip install "accum_jax[tpu-plan]"``);
* a GPU type with an optional count, ``'<gpu>'`` or ``'<gpu>:<n>'`` (8 per
  host; 16 is two hosts of 8): ``'h100'`` (H100 SXM 80GB), ``'a100-40gb'``,
  ``'a100-80gb'`` (A100 SXM), ``'l4'`` (L4 24GB): XLA:GPU, from the CUDA
  plugin (``pip install "accum_jax[gpu-plan]"``); any other GPU through
  :func:`gpu_target` and its description;
* ``'cpu'``, ``'cpu:<n>'``: this machine's XLA:CPU devices (``n`` of them,
  which needs ``--xla_force_host_platform_device_count`` set before jax is
  imported); their memory is not known.

Nothing compiled for a compile-only device can run: memory, HLO and flops
only. What such a compile cannot see (the runtime's own reservations,
fragmentation, the program's code) is what :attr:`Target.headroom` keeps
free; see ``docs/planning.md``.
"""

import os
import re
from typing import Any, NamedTuple

import jax


def _gpu(name: str, *, sm: tuple[int, int], cores: int, fpus: int,
         smem_core: int, smem_optin: int, threads_core: int, bandwidth: int,
         l2: int, clock: float, memory: int) -> str:
  """A GpuTargetConfig text proto, the device description XLA:GPU compiles
  for, from a GPU's published figures."""
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} threads_per_core_limit: {threads_core}
  core_count: {cores} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {sm[0]} minor: {sm[1]} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 patch: 0 }}
device_description_str: "{name}"
"""


# Published figures of each GPU (the memory as CUDA reports it).
GPUS = {
    'h100': _gpu('NVIDIA H100 80GB HBM3', sm=(9, 0), cores=132, fpus=128,
                 smem_core=233472, smem_optin=232448, threads_core=2048,
                 bandwidth=3352320000000, l2=52428800, clock=1.98,
                 memory=84929347584),
    'a100-80gb': _gpu('NVIDIA A100-SXM4-80GB', sm=(8, 0), cores=108, fpus=64,
                      smem_core=167936, smem_optin=166912, threads_core=2048,
                      bandwidth=2039040000000, l2=41943040, clock=1.41,
                      memory=85100068864),
    'a100-40gb': _gpu('NVIDIA A100-SXM4-40GB', sm=(8, 0), cores=108, fpus=64,
                      smem_core=167936, smem_optin=166912, threads_core=2048,
                      bandwidth=1555200000000, l2=41943040, clock=1.41,
                      memory=42331013120),
    'l4': _gpu('NVIDIA L4', sm=(8, 9), cores=58, fpus=128, smem_core=102400,
               smem_optin=101376, threads_core=1536, bandwidth=300000000000,
               l2=50331648, clock=2.04, memory=24152899584),
}
H100 = GPUS['h100']
GPUS_PER_HOST = 8

# High-bandwidth memory of one TPU device, by device_kind (libtpu's
# compile-only devices report no memory). v5p's is as published: 95 GB.
TPU_MEMORY = {
    'TPU v2': 8 * 2**30,
    'TPU v3': 16 * 2**30,
    'TPU v4': 32 * 2**30,
    'TPU v5 lite': 16 * 2**30,
    'TPU v5': 95 * 10**9,
    'TPU v5p': 95 * 10**9,
    'TPU v6 lite': 32 * 2**30,
}

# The share of a device's memory a plan keeps free by default. On GPUs JAX
# preallocates 75% of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION=.75), the
# most a step gets unless that is raised. On TPUs the runtime keeps its own
# scratch and the program's code outside the compiled figures.
HEADROOM = {'gpu': 0.25, 'tpu': 0.05, 'cpu': 0.0}

TPU_EXTRA = 'pip install "accum_jax[tpu-plan]" (libtpu, the same version as jax)'
GPU_EXTRA = ('pip install "accum_jax[gpu-plan]" (the CUDA plugin, the same '
             'version as jax)')


class Target(NamedTuple):
  """Compile-only devices of an accelerator, and the memory a step may use.

  Attributes:
    name: the name it was loaded from (e.g. ``'tpu:v5e:2x4'``).
    devices: its devices in mesh order, for ``jax.make_mesh(...,
      devices=target.devices)``.
    memory_bytes: one device's memory, or ``None`` where it is not known
      (XLA:CPU).
    headroom: the share of ``memory_bytes`` a plan keeps free (see
      :func:`load_target`).
  """

  name: str
  devices: tuple[Any, ...]
  memory_bytes: int | None
  headroom: float

  @property
  def budget_bytes(self) -> int | None:
    """The per-device bytes a step may use: ``memory_bytes`` less the
    headroom, ``None`` where the memory is not known."""
    if self.memory_bytes is None:
      return None
    return int(self.memory_bytes * (1.0 - self.headroom))

  @property
  def platform(self) -> str:
    return self.devices[0].platform

  def describe(self, budget_bytes: int | None = None) -> str:
    """One line: the devices, their memory and the budget (``budget_bytes``
    where one was given instead)."""
    kind = self.devices[0].device_kind
    line = f'{self.name}: {len(self.devices)} x {kind}'
    if self.memory_bytes is not None:
      line += f', {self.memory_bytes / 2**30:.2f} GiB each'
    if budget_bytes is not None:
      line += f', budget {budget_bytes / 2**30:.2f} GiB (given)'
    elif self.memory_bytes is not None:
      line += (f', budget {self.budget_bytes / 2**30:.2f} GiB '
               f'({self.headroom:.0%} headroom)')
    return line


def _headroom(platform: str, headroom: float | None) -> float:
  headroom = HEADROOM.get(platform, 0.0) if headroom is None else headroom
  if not 0.0 <= headroom < 1.0:
    raise ValueError(f'headroom must be a fraction in [0, 1), got {headroom}.')
  return float(headroom)


def _count(rest: str, target: str) -> int:
  try:
    n = int(rest or 1)
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f'target {target!r}: the device count after ":" must be '
                     f'a positive integer, got {rest!r}.')
  return n


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _tpu_options(topology: str) -> dict[str, Any]:
  """libtpu's options for a topology: a slice of fewer than the default
  host's 4 chips (``v5e:1x1``, one chip) is one host of its own size; a v4
  is one device per chip."""
  dims = re.fullmatch(r'[^:]+:(\d+)x(\d+)(?:x(\d+))?', topology)
  if dims is None:
    return {}
  shape = tuple(int(d) for d in dims.groups(default='1'))
  options = {}
  if topology.startswith('v4'):
    # One device per chip (both TensorCores), as JAX runs a v4; libtpu's
    # default describes one per core.
    options['chip_config_name'] = 'megacore'
  if shape[0] * shape[1] * shape[2] < 4:
    options['chips_per_host_bounds'] = shape
  return options


def gpu_target(description: str, count: int = 1, *,
               headroom: float | None = None, name: str | None = None
               ) -> Target:
  """A :class:`Target` of ``count`` GPUs of any type, from its description.

  Args:
    description: a ``GpuTargetConfig`` text proto (the form of
      ``accum_jax._targets.GPUS``' entries, or of XLA's own GPU specs), whose
      ``gpu_device_info.device_memory_size`` is the device's memory.
    count: the number of GPUs, 8 per host.
    headroom: the share of the memory to keep free; by default 0.25 (JAX
      preallocates 75% of a GPU's memory).
    name: a name for the tables; by default the description's.

  Returns:
    The :class:`Target`.

  Raises:
    ValueError: a description without ``device_memory_size``, or a count
      that is not 1 to 8 or a multiple of 8.
    RuntimeError: the CUDA plugin is not installed, naming the pip extra.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  memory = re.search(r'device_memory_size:\s*(\d+)', description)
  if memory is None:
    raise ValueError('The GPU description has no gpu_device_info '
                     '{ device_memory_size: <bytes> }.')
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise ValueError(f'{count} GPUs: give 1 to {GPUS_PER_HOST}, or a multiple '
                     f'of {GPUS_PER_HOST} (hosts of {GPUS_PER_HOST}).')
  hosts = max(count // GPUS_PER_HOST, 1)
  label = re.search(r'device_description_str:\s*"([^"]*)"', description)
  name = name or (label.group(1) if label else 'gpu') + f':{count}'
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', target_config=description,
        topology=f'1x{hosts}x{count // hosts}')
  except Exception as e:  # noqa: BLE001 - the plugin's errors vary by version
    raise RuntimeError(
        f'target {name!r}: XLA:GPU could not load it ({_first_line(e)}). The '
        f'GPU compiler comes with the CUDA plugin: {GPU_EXTRA}.') from e
  return Target(name, tuple(topology.devices), int(memory.group(1)),
                _headroom('gpu', headroom))


def load_target(target: 'str | Target', *, headroom: float | None = None
                ) -> Target:
  """The :class:`Target` a name describes (see the module docstring).

  Args:
    target: ``'tpu:<topology>'``, ``'<gpu>[:<n>]'`` (``h100``,
      ``a100-40gb``, ``a100-80gb``, ``l4``), ``'cpu[:<n>]'``, or a
      :class:`Target` (returned as is, with ``headroom`` applied if given).
    headroom: the share of each device's memory a plan keeps free; by
      default 0.25 on GPUs (JAX preallocates 75% of the memory) and 0.05 on
      TPUs (the runtime's own scratch and the program's code).

  Returns:
    The :class:`Target`.

  Raises:
    ValueError: an unknown target name.
    RuntimeError: the target's compiler is not installed or cannot describe
      it, naming the pip extra that brings it.

  Examples:
    >>> import accum_jax
    >>> t = accum_jax.load_target('cpu')
    >>> t.name, len(t.devices), t.memory_bytes
    ('cpu', 1, None)
  """
  if isinstance(target, Target):
    if headroom is None:
      return target
    return target._replace(headroom=_headroom(target.platform, headroom))
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
    return Target(target, tuple(found[:n]), None, _headroom('cpu', headroom))
  if kind == 'tpu':
    try:
      topology = topologies.get_topology_desc(
          platform='tpu', topology_name=rest, **_tpu_options(rest))
    except Exception as e:  # noqa: BLE001 - libtpu's errors vary by version
      raise RuntimeError(
          f'target {target!r}: XLA:TPU could not describe topology {rest!r} '
          f'({_first_line(e)}). The TPU compiler comes with libtpu: '
          f'{TPU_EXTRA}. Topologies look like v5e:2x4, v4:2x2x1.') from e
    found = tuple(topology.devices)
    return Target(target, found, TPU_MEMORY.get(found[0].device_kind),
                  _headroom('tpu', headroom))
  if kind in GPUS:
    return gpu_target(GPUS[kind], _count(rest, target), headroom=headroom,
                      name=target)
  raise ValueError(
      f'Unknown target {target!r}: use "tpu:<topology>" (e.g. tpu:v5e:2x4), '
      f'a GPU ({", ".join(GPUS)}, with ":<n>" for n of them), "cpu[:<n>]", '
      'or accum_jax.gpu_target(description) for another GPU.')


def devices(target: str) -> list[Any]:
  """The devices of ``target`` (see :func:`load_target`), in mesh order."""
  return list(load_target(target).devices)
