"""accum_jax: gradient accumulation for JAX and optax.

Split a batch into ``k`` micro-batches, run them through one ``lax.scan`` in
one jitted step, and apply the optimizer once, with the same numbers as the
full-batch step at the memory of one micro-batch.
"""

from accum_jax._accumulate import accumulate
from accum_jax._accumulate import AccumulateState
from accum_jax._accumulate import AccumulateTransformation
from accum_jax._planner import compiled_memory
from accum_jax._planner import CompiledMemory
from accum_jax._planner import MemoryPlan
from accum_jax._planner import PlanCandidate
from accum_jax._planner import plan_microbatches
from accum_jax._scan import value_and_grad
from accum_jax._scan import value_and_update
from accum_jax._split import split_batch

__version__ = '0.1.0'

__all__ = (
    'AccumulateState',
    'AccumulateTransformation',
    'CompiledMemory',
    'MemoryPlan',
    'PlanCandidate',
    'accumulate',
    'compiled_memory',
    'plan_microbatches',
    'split_batch',
    'value_and_grad',
    'value_and_update',
)
