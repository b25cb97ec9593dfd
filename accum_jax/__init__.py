"""accum_jax: gradient accumulation for JAX and optax.

Split a batch into ``k`` micro-batches, run them through one ``lax.scan`` in
one jitted step, and apply the optimizer once, with the same numbers as the
full-batch step at the memory of one micro-batch.
"""

import importlib

from accum_jax._accumulate import (
  AccumulateState,
  AccumulateTransformation,
  accumulate,
  flush,
)
from accum_jax._noise import NoiseScale, adaptive_num_microbatches
from accum_jax._norms import WindowNorms
from accum_jax._options import LoopOptions
from accum_jax._readers import has_updated, noise_scale, window_norms
from accum_jax._scan import value_and_grad, value_and_update
from accum_jax._split import concat_microbatches, split_batch
from accum_jax._targets import Target, gpu_target, load_target

__version__ = '0.1.0'

# Flax and Equinox are optional dependencies, and the planner reads
# compiled HLO text: these names import their modules on first use, so that
# `import accum_jax` loads none of them.
_LAZY = {
    'filter_value_and_grad': 'accum_jax._equinox',
    'filter_value_and_update': 'accum_jax._equinox',
    'linen_train_step': 'accum_jax._flax',
    'nnx_train_step': 'accum_jax._flax',
    'CompiledMemory': 'accum_jax._planner',
    'MemoryPlan': 'accum_jax._planner',
    'PlanCandidate': 'accum_jax._planner',
    'PlanDoesNotFit': 'accum_jax._planner',
    'compiled_memory': 'accum_jax._planner',
    'plan_microbatches': 'accum_jax._planner',
}


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


__all__ = (
    'AccumulateState',
    'AccumulateTransformation',
    'CompiledMemory',
    'LoopOptions',
    'MemoryPlan',
    'NoiseScale',
    'PlanCandidate',
    'PlanDoesNotFit',
    'Target',
    'WindowNorms',
    'accumulate',
    'adaptive_num_microbatches',
    'compiled_memory',
    'concat_microbatches',
    'filter_value_and_grad',
    'filter_value_and_update',
    'flush',
    'gpu_target',
    'has_updated',
    'linen_train_step',
    'load_target',
    'nnx_train_step',
    'noise_scale',
    'plan_microbatches',
    'split_batch',
    'value_and_grad',
    'value_and_update',
    'window_norms',
)
