"""Splitting a batch into micro-batches, and the checks on what is split.

Micro-batch ``j`` of ``k`` takes rows ``j, j + k, j + 2k, ...`` of every batch
leaf (a strided split). The batch is reshaped to ``(B // k, k, ...)``, which is
free, and each micro-batch is a dynamic index along axis 1. A batch sharded
along its leading axis therefore stays sharded: every device keeps the rows it
already holds, and no transposed copy of the batch is ever made.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from accum_jax._checks import check_num_microbatches


def batch_size(batch: Any, num_microbatches: int) -> int:
  """Returns the shared leading size of ``batch``'s leaves, checked against k.

  Raises:
    ValueError: if ``batch`` has no leaves, a leaf is a scalar, the leaves'
      leading sizes differ, or the size is not divisible by ``num_microbatches``.
  """
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError('The batch has no array leaves to split into micro-batches.')
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(path) or '<batch>'
    if not shape:
      raise ValueError(
          f'Batch leaf {name} is a scalar; every batch leaf needs a leading '
          'batch axis. Pass per-step constants as extra arguments instead.'
      )
    sizes.setdefault(shape[0], name)
  if len(sizes) > 1:
    detail = ', '.join(f'{name}: {size}' for size, name in sizes.items())
    raise ValueError(
        'All batch leaves must share the leading (batch) size; got different '
        f'sizes ({detail}).'
    )
  (size,) = sizes
  if size % num_microbatches:
    raise ValueError(
        f'The batch size {size} is not divisible by num_microbatches='
        f'{num_microbatches}; use a batch size that is a multiple of '
        f'{num_microbatches} (e.g. {size - size % num_microbatches or num_microbatches}).'
    )
  return size


def reshape_batch(batch: Any, num_microbatches: int) -> Any:
  """Reshapes every leaf from ``(B, ...)`` to ``(B // k, k, ...)``."""
  batch_size(batch, num_microbatches)

  def reshape(x):
    x = jnp.asarray(x)
    return x.reshape(x.shape[0] // num_microbatches, num_microbatches,
                     *x.shape[1:])

  return jax.tree.map(reshape, batch)


def take_microbatch(reshaped: Any, index: jax.Array) -> Any:
  """Micro-batch ``index`` of a batch returned by :func:`reshape_batch`."""
  return jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False),
      reshaped,
  )


def split_batch(batch: Any, num_microbatches: int) -> Any:
  """Splits ``batch`` into ``num_microbatches`` strided micro-batches.

  Micro-batch ``j`` holds rows ``j, j + k, j + 2k, ...`` of every leaf. This
  stacks the micro-batches along a new leading axis, which is handy to inspect
  the split; the loops in accum_jax index the reshaped batch instead, so they
  never copy it.

  Args:
    batch: a pytree whose leaves share a leading batch axis of size ``B``.
    num_microbatches: ``k``, a divisor of ``B``.

  Returns:
    A pytree like ``batch`` whose leaves have shape ``(k, B // k, ...)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import accum_jax
    >>> accum_jax.split_batch(jnp.arange(6), 2)
    Array([[0, 2, 4],
           [1, 3, 5]], dtype=int32)
  """
  num_microbatches = check_num_microbatches(num_microbatches)
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1),
                      reshape_batch(batch, num_microbatches))
