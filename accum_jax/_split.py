"""Splitting a batch into micro-batches, and the checks on what is split.

Micro-batch ``j`` of ``k`` takes rows ``j, j + k, j + 2k, ...`` of every batch
leaf (a strided split). The batch axis of size ``B`` is reshaped to
``(B // k, k)``, which is free, and each micro-batch is a dynamic index along
the new ``k`` axis. A batch sharded along its batch axis therefore stays
sharded: every device keeps the rows it already holds, and no transposed copy
of the batch is ever made. :func:`concat_microbatches` is the inverse of
:func:`split_batch`.

:class:`BatchArgs` says which arguments of a loss hold the batch and along
which axis, as ``optax.microbatching.microbatch``'s ``argnums``, ``argnames``
and ``in_axes`` do.
"""

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from accum_jax._checks import check_num_microbatches


def _tree_axes(axes: Any, batch: Any) -> list[tuple[int, Any, Any]]:
  """``(axis, path, leaf)`` for every leaf of ``batch``; ``axes`` is an int
  for every leaf or a tuple of ints, one per element of the tuple ``batch``."""
  if isinstance(axes, int):
    return [(axes, p, x) for p, x in jax.tree_util.tree_leaves_with_path(batch)]
  out = []
  for i, (axis, part) in enumerate(zip(axes, batch, strict=True)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(part):
      out.append((axis, (jax.tree_util.SequenceKey(i), *path), leaf))
  return out


def map_axes(fn, axes: Any, batch: Any) -> Any:
  """``fn(leaf, axis)`` on every leaf, ``axes`` as in :func:`_tree_axes`."""
  if isinstance(axes, int):
    return jax.tree.map(lambda x: fn(x, axes), batch)
  return tuple(jax.tree.map(lambda x, a=a: fn(x, a), part)
               for a, part in zip(axes, batch, strict=True))


def batch_size(batch: Any, num_microbatches: int, axes: Any = 0) -> int:
  """Returns the shared batch size of ``batch``'s leaves, checked against k.

  ``axes`` is the batch axis of every leaf (an int), or one int per element
  of a tuple ``batch``.

  Raises:
    ValueError: if ``batch`` has no leaves, a leaf has no batch axis, the
      leaves' batch sizes differ, or the size is not divisible by
      ``num_microbatches``.
  """
  leaves = _tree_axes(axes, batch)
  if not leaves:
    raise ValueError('The batch has no array leaves to split into micro-batches.')
  sizes = {}
  for axis, path, leaf in leaves:
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(tuple(path)) or '<batch>'
    if not shape:
      raise ValueError(
          f'Batch leaf {name} is a scalar; every batch leaf needs a leading '
          'batch axis. Pass per-step constants as extra arguments instead.'
      )
    if not -len(shape) <= axis < len(shape):
      raise ValueError(
          f'Batch leaf {name} has shape {shape}, with no axis {axis} to split '
          '(in_axes).'
      )
    sizes.setdefault(shape[axis], name)
  if len(sizes) > 1:
    detail = ', '.join(f'{name}: {size}' for size, name in sizes.items())
    what = ('leading (batch) size' if axes == 0 else
            'batch size along their in_axes')
    raise ValueError(
        f'All batch leaves must share the {what}; got different sizes '
        f'({detail}).'
    )
  (size,) = sizes
  if size % num_microbatches:
    raise ValueError(
        f'The batch size {size} is not divisible by num_microbatches='
        f'{num_microbatches}; use a batch size that is a multiple of '
        f'{num_microbatches} (e.g. {size - size % num_microbatches or num_microbatches}).'
    )
  return size


def _reshape(x, axis: int, k: int):
  x = jnp.asarray(x)
  axis %= x.ndim
  return x.reshape(*x.shape[:axis], x.shape[axis] // k, k, *x.shape[axis + 1:])


def reshape_batch(batch: Any, num_microbatches: int, axes: Any = 0) -> Any:
  """Reshapes every leaf's batch axis from ``B`` to ``(B // k, k)``."""
  batch_size(batch, num_microbatches, axes)
  return map_axes(lambda x, a: _reshape(x, a, num_microbatches), axes, batch)


def take_microbatch(reshaped: Any, index: jax.Array, axes: Any = 0) -> Any:
  """Micro-batch ``index`` of a batch returned by :func:`reshape_batch`."""

  def take(x, axis):
    axis %= x.ndim - 1  # the leaf's own rank, before the reshape
    return jax.lax.dynamic_index_in_dim(x, index, axis=axis + 1,
                                        keepdims=False)

  return map_axes(take, axes, reshaped)


def split_batch(batch: Any, num_microbatches: int, axis: int = 0) -> Any:
  """Splits ``batch`` into ``num_microbatches`` strided micro-batches.

  Micro-batch ``j`` holds rows ``j, j + k, j + 2k, ...`` (along ``axis``) of
  every leaf. This stacks the micro-batches along a new leading axis, which
  is handy to inspect the split; the loops in accum_jax index the reshaped
  batch instead, so they never copy it. :func:`concat_microbatches` is its
  inverse.

  Args:
    batch: a pytree whose leaves share a batch axis of size ``B``.
    num_microbatches: ``k``, a divisor of ``B``.
    axis: the batch axis of every leaf (``1`` for sequence-first ``(T, B,
      ...)`` data).

  Returns:
    A pytree like ``batch`` whose leaves have a new leading axis of size
    ``k`` and ``B // k`` rows along ``axis`` (shape ``(k, B // k, ...)`` for
    ``axis=0``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import accum_jax
    >>> accum_jax.split_batch(jnp.arange(6), 2)
    Array([[0, 2, 4],
           [1, 3, 5]], dtype=int32)
  """
  num_microbatches = check_num_microbatches(num_microbatches)

  def stack(x, a):
    a %= jnp.ndim(x) - 1
    return jnp.moveaxis(x, a + 1, 0)

  return map_axes(stack, axis, reshape_batch(batch, num_microbatches, axis))


def concat_microbatches(microbatches: Any, axis: int = 0) -> Any:
  """Puts micro-batches split by :func:`split_batch` back in row order.

  The inverse of :func:`split_batch`: leaves of shape ``(k, B // k, ...)``
  become ``(B, ...)``, row ``j + k * r`` being row ``r`` of micro-batch
  ``j``. Use it on per-row aux returned with ``aux='stack'`` (or pass
  ``aux='concat'`` to the drivers, which return it in row order directly).

  Args:
    microbatches: a pytree whose leaves have a leading micro-batch axis of
      size ``k`` and a batch axis ``axis`` (counted without the leading one).
    axis: the batch axis of each micro-batch.

  Returns:
    A pytree like ``microbatches`` whose leaves have ``k * (B // k)`` rows
    along ``axis`` and no leading micro-batch axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> import accum_jax
    >>> parts = accum_jax.split_batch(jnp.arange(6), 2)
    >>> accum_jax.concat_microbatches(parts)
    Array([0, 1, 2, 3, 4, 5], dtype=int32)
  """

  def merge(x):
    x = jnp.asarray(x)
    if x.ndim < 2:
      raise ValueError(
          'concat_microbatches needs leaves of shape (k, rows, ...), got shape'
          f' {x.shape}.'
      )
    a = axis % (x.ndim - 1)
    x = jnp.moveaxis(x, 0, a + 1)  # (..., rows, k, ...)
    return x.reshape(*x.shape[:a], x.shape[a] * x.shape[a + 1],
                     *x.shape[a + 2:])

  return jax.tree.map(merge, microbatches)


def _as_tuple(x, name: str, kind) -> tuple:
  if isinstance(x, kind):
    return (x,)
  try:
    out = tuple(x)
  except TypeError:
    raise TypeError(f'{name} must be a {kind.__name__} or a sequence of them, '
                    f'got {x!r}.') from None
  if not all(isinstance(v, kind) for v in out):
    raise TypeError(f'{name} must be a {kind.__name__} or a sequence of them, '
                    f'got {x!r}.')
  return out


@dataclasses.dataclass(frozen=True)
class BatchArgs:
  """Which arguments of ``loss_fn(params, *args, **kwargs)`` hold the batch.

  Attributes:
    argnums: positions in ``loss_fn``'s arguments (``params`` is 0).
    argnames: keyword arguments.
    axes: the batch axis of each, aligned with ``argnums + argnames``.
  """

  argnums: tuple[int, ...] = (1,)
  argnames: tuple[str, ...] = ()
  axes: tuple[int, ...] = (0,)

  @classmethod
  def make(cls, argnums: Any = None, argnames: Any = (),
           in_axes: Any = 0) -> 'BatchArgs':
    """Checks and normalises the drivers' ``batch_argnums`` (None: the
    argument after params, unless ``batch_argnames`` are given),
    ``batch_argnames`` and ``in_axes``."""
    argnames = _as_tuple(argnames, 'batch_argnames', str)
    if argnums is None:
      argnums = () if argnames else 1
    argnums = _as_tuple(argnums, 'batch_argnums', int)
    count = len(argnums) + len(argnames)
    if isinstance(in_axes, bool) or (not isinstance(in_axes, int)
                                     and in_axes is not None
                                     and not isinstance(in_axes, Sequence)):
      raise TypeError(f'in_axes must be an int or a sequence of ints, got '
                      f'{in_axes!r}.')
    axes = (in_axes,) * count if isinstance(in_axes, int) else _as_tuple(
        in_axes, 'in_axes', int)
    if not count:
      raise ValueError('batch_argnums and batch_argnames name no argument to '
                       'split into micro-batches.')
    if len(axes) != count:
      raise ValueError(
          f'in_axes has {len(axes)} entries but batch_argnums + batch_argnames '
          f'name {count} arguments; give one axis per argument, in that order.'
      )
    if any(n < 1 for n in argnums):
      raise ValueError(
          f'batch_argnums={argnums}: position 0 is the differentiated params; '
          'the batch is at position 1 or later.'
      )
    if len(set(argnums)) != len(argnums) or len(set(argnames)) != len(argnames):
      raise ValueError('batch_argnums and batch_argnames must not repeat an '
                       'argument.')
    return cls(tuple(map(operator.index, argnums)), argnames, axes)

  @property
  def single(self) -> bool:
    """Whether the batch is the one argument after ``params``."""
    return self.argnums == (1,) and not self.argnames

  @property
  def tree_axes(self) -> Any:
    """The axes as :func:`reshape_batch` takes them for :meth:`pick`'s
    batch."""
    return self.axes[0] if self.single else self.axes

  def pick(self, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """``(batch, rest, kwargs)`` from ``loss_fn``'s arguments after params.

    With :attr:`single` the batch is the first argument and ``rest`` the
    others; else the batch is a tuple, one element per batched argument, and
    ``rest`` all positional arguments, the batched ones left as ``None``.
    """
    if self.single:
      if not args:
        raise TypeError('The batch (the argument after params) is missing.')
      return args[0], tuple(args[1:]), kwargs
    missing = [n for n in self.argnums if n - 1 >= len(args)]
    missing += [n for n in self.argnames if n not in kwargs]
    if missing:
      raise TypeError(
          f'The batched arguments {missing} (batch_argnums / batch_argnames) '
          f'were not passed; got {len(args) + 1} positional arguments (params '
          f'included) and keywords {sorted(kwargs)}.'
      )
    batch = tuple(args[n - 1] for n in self.argnums) + tuple(
        kwargs[n] for n in self.argnames)
    rest = tuple(None if i + 1 in self.argnums else a
                 for i, a in enumerate(args))
    kwargs = {n: v for n, v in kwargs.items() if n not in self.argnames}
    return batch, rest, kwargs

  def put(self, batch: Any, rest: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inverse of :meth:`pick`, on a micro-batch."""
    if self.single:
      return (batch, *rest), kwargs
    args = list(rest)
    for n, part in zip(self.argnums, batch):
      args[n - 1] = part
    kwargs = dict(kwargs)
    for n, part in zip(self.argnames, batch[len(self.argnums):]):
      kwargs[n] = part
    return tuple(args), kwargs

  def weight_args(self, microbatch: Any) -> tuple[tuple, dict]:
    """``weight_fn``'s arguments: the micro-batch of each batched argument,
    positional ones first, then the keyword ones."""
    if self.single:
      return (microbatch,), {}
    pos = tuple(microbatch[:len(self.argnums)])
    return pos, dict(zip(self.argnames, microbatch[len(self.argnums):]))


def params_first(loss_fn: Any, argnums: Any, batch_argnums: Any,
                 batch_argnames: Any) -> tuple[Any, Any]:
  """``loss_fn`` with its differentiated argument ``argnums`` moved first,
  and ``batch_argnums`` (positions in ``loss_fn``'s own arguments) moved
  with it, as the drivers call ``loss_fn(params, *args)``."""
  if isinstance(argnums, bool) or not isinstance(argnums, (int, np.integer)):
    raise TypeError(
        f'argnums must be one int, the position of the differentiated '
        f'argument, got {argnums!r}; pack several into one pytree.')
  argnums = operator.index(argnums)
  if argnums < 0:
    raise ValueError(f'argnums={argnums}: give a position >= 0.')
  if argnums == 0:
    return loss_fn, batch_argnums
  if batch_argnums is None:
    if not batch_argnames:
      raise ValueError(
          f'argnums={argnums}: name the batched arguments too, as positions '
          f'in loss_fn\'s own arguments (e.g. batch_argnums=({argnums - 1},)'
          ' for the one before the differentiated one) or batch_argnames=.')
    moved = None
  else:
    given = _as_tuple(batch_argnums, 'batch_argnums', int)
    if argnums in given:
      raise ValueError(
          f'batch_argnums={given} includes argnums={argnums}: the '
          'differentiated argument is not split into micro-batches.')
    moved = tuple(p + 1 if p < argnums else p for p in given)

  def moved_loss(params, *args, **kwargs):
    return loss_fn(*args[:argnums], params, *args[argnums:], **kwargs)

  return moved_loss, moved
