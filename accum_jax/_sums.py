"""What a micro-batch loop adds up, and how the sums are finished and reduced.

One :class:`Sums` is the loop's running total: the weighted gradient sum, the
weight sum, the weighted loss sum, the reduced aux and the count of
micro-batches dropped as non-finite. The loop body calls :meth:`Sums.add`
with each micro-batch's :class:`Micro` and knows nothing else; on a mesh,
:meth:`Sums.reduce` sums every device's totals once, after the loop; the
drivers call :meth:`Sums.finish` for the value and aux of the whole batch.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from accum_jax import _varying


class Shapes(NamedTuple):
  """Abstract outputs of one micro-batch (``jax.ShapeDtypeStruct`` trees).

  ``summed`` is a tree like ``aux`` of bools: True for a floating leaf summed
  over micro-batches (``aux='sum'``) instead of averaged; None for none.
  """

  value: Any
  aux: Any
  grads: Any
  summed: Any = None


def _zeros(like: Any, dtype: Any) -> jax.Array:
  """Zeros of ``like``'s shape, sharded as ``like`` along the mesh axes its
  type names (explicit axes the loop does not split over: a 2-D layout's
  'model' axis); plain zeros otherwise."""
  spec = getattr(getattr(like, 'sharding', None), 'spec', None)
  if spec is not None and any(s is not None for s in spec):
    return jnp.zeros(like.shape, dtype, out_sharding=spec)
  return jnp.zeros(like.shape, dtype)


def summed_leaves(modes: Any, aux_like: Any) -> Any:
  """The ``Shapes.summed`` tree of an aux reduction: ``modes`` is
  ``'mean'``, ``'sum'`` or a pytree prefix of them over ``aux_like``."""
  if modes is None or modes == 'mean' or aux_like is None:
    return None
  try:
    return jax.tree.map(
        lambda mode, sub: jax.tree.map(lambda _: mode == 'sum', sub), modes,
        aux_like)
  except ValueError as e:
    raise ValueError(
        "aux= must be 'mean', 'sum', 'stack', 'concat' or a pytree prefix of "
        f"'mean' and 'sum' over the aux the loss returns: {e}") from e


def _flags(summed: Any, tree: Any) -> Any:
  return jax.tree.map(lambda _: False, tree) if summed is None else summed


class Micro(NamedTuple):
  """What one micro-batch adds: its loss, aux, gradient and weight.

  Attributes:
    value: the micro-batch's loss (None cross-step).
    aux: its aux (a pytree, or None).
    grads: its gradient.
    weight: float32 scalar, what it adds to the weight sum.
    bad: int32 0/1, whether it was dropped as non-finite (None under
      ``'propagate'``).
    grad_scale: what the gradient is added with: None for its weight, else a
      float32 scalar (1 for a gradient that already carries its weight).
  """

  value: Any
  aux: Any
  grads: Any
  weight: jax.Array
  bad: Any
  grad_scale: jax.Array


def sum_dtype(dtype) -> jnp.dtype:
  """Floating values are summed in at least float32; others in their dtype."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def acc_dtype(dtype, accumulator_dtype) -> jnp.dtype:
  """The accumulator dtype for a gradient of ``dtype``: never narrower."""
  if accumulator_dtype is None:
    return jnp.dtype(dtype)
  return jnp.promote_types(dtype, accumulator_dtype)


def add_weighted(acc: Any, grads: Any, weight: jax.Array) -> Any:
  """``acc + weight * grads``, computed in the accumulator's dtype."""
  return jax.tree.map(lambda a, g: a + weight.astype(a.dtype) * g.astype(a.dtype),
                      acc, grads)


def mean_of(acc: Any, total_weight: jax.Array, like: Any) -> Any:
  """``acc / total_weight`` in the dtypes of ``like``; 0 for a zero weight."""
  safe = jnp.where(total_weight > 0, total_weight, 1.0)
  return jax.tree.map(
      lambda a, g: (a / safe.astype(a.dtype)).astype(g.dtype), acc, like)


def _psum(x, axes):
  if not axes:
    return x
  return jax.lax.psum(_varying.to_varying(x, axes), axes)


def _reduce_leaf(a, axes):
  """Sums over the devices; booleans are OR-ed."""
  if a.dtype == jnp.bool_:
    return _psum(a.astype(jnp.int32), axes) > 0
  return _psum(a, axes)


def _weighted_mean(a, weights, total, axes):
  """Per micro-batch (leading axis) weighted mean over the devices."""
  w = weights.reshape(weights.shape + (1,) * (a.ndim - 1))
  safe = jnp.where(total > 0, total, 1.0).reshape(w.shape)
  wide = jnp.promote_types(a.dtype, jnp.float32)
  return (_psum(w.astype(wide) * a.astype(wide), axes)
          / safe.astype(wide)).astype(a.dtype)


def _floating(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


class Sums(NamedTuple):
  """The running totals of a micro-batch loop.

  Attributes:
    grads: ``sum_j w_j g_j`` in the accumulator dtype.
    weight: ``sum_j w_j``, float32, over this loop's micro-batches (a window
      left part-full before it is the caller's to add).
    value: the weighted mean ``sum_j w_j L_j / sum_j w_j`` so far, kept as a
      running mean in at least float32 (float64 under x64), so that a finite
      mean stays finite where the sum would overflow; 0 while the weight is
      0.
    aux: floating leaves ``sum_j w_j a_j``, integer leaves summed, boolean
      leaves OR-ed; or, stacked, each micro-batch's aux (leading axis ``k``);
      None without aux.
    bad: int32 count of micro-batches dropped as non-finite (None under
      ``'propagate'``).
    aux_weights: with stacked aux, each micro-batch's weight (shape ``(k,)``),
      for the mean over devices; else None.
    aux_rows: with concatenated aux, every row's aux, its batch axis of size
      ``B // k`` split into ``(B // k, k)`` like the batch's (see
      :func:`rows_zeros`), this device's rows on a mesh; else None.
    noise: the noise scale ``Tally`` of the micro-batches (scalars), or None.
    skip_info: with a skip predicate, its info after the last micro-batch
      (the transform's ``skip_state``); else None.
  """

  grads: Any
  weight: jax.Array
  value: jax.Array
  aux: Any
  bad: Any
  aux_weights: Any = None
  aux_rows: Any = None
  noise: Any = None
  skip_info: Any = None

  @classmethod
  def zeros(cls, shapes: Shapes, accumulator_dtype: Any, *, reduce_aux: bool,
            count_bad: bool, grads: Any = None, noise: Any = None) -> 'Sums':
    """Empty sums for micro-batches of ``shapes``; the gradient sum starts
    from ``grads`` when given (a window left part-full, whose buffer then
    serves as the loop's carry); ``noise`` is an empty noise scale tally, or
    None."""
    if grads is None:
      grads = jax.tree.map(
          lambda g: _zeros(g, acc_dtype(g.dtype, accumulator_dtype)),
          shapes.grads)
    aux = None
    if reduce_aux and shapes.aux is not None:
      aux = jax.tree.map(lambda a: jnp.zeros(a.shape, sum_dtype(a.dtype)),
                         shapes.aux)
    bad = jnp.zeros([], jnp.int32) if count_bad else None
    return cls(grads, jnp.zeros([], jnp.float32),
               jnp.zeros([], sum_dtype(shapes.value.dtype)), aux, bad,
               noise=noise)

  def add(self, micro: Micro, summed: Any = None) -> 'Sums':
    """The sums with one more micro-batch (``summed``: see
    :class:`Shapes`)."""
    w = micro.weight

    def add_aux(c, a, plain):
      a = jnp.asarray(a)
      if jnp.issubdtype(a.dtype, jnp.floating) and plain:
        # A sum: every micro-batch that counts (weight not 0) adds its own.
        return c + jnp.where(w != 0, a.astype(c.dtype), 0)
      if jnp.issubdtype(a.dtype, jnp.floating):
        return c + w.astype(c.dtype) * a.astype(c.dtype)
      if a.dtype == jnp.bool_:
        return c | a
      return c + a

    weight = self.weight + w
    value = micro.value.astype(self.value.dtype)
    share = jnp.where(weight == 0, 0, w.astype(value.dtype)
                      / weight.astype(value.dtype))  # NaN for a NaN weight
    return Sums(
        grads=add_weighted(self.grads, micro.grads,
                           w if micro.grad_scale is None else micro.grad_scale),
        weight=weight,
        value=jnp.where(share == 0, self.value,
                        self.value + share * (value - self.value)),
        aux=None if self.aux is None else jax.tree.map(
            add_aux, self.aux, micro.aux, _flags(summed, self.aux)),
        bad=None if self.bad is None else self.bad + micro.bad,
        aux_weights=self.aux_weights,
        aux_rows=self.aux_rows,
        noise=self.noise,
        skip_info=self.skip_info,
    )

  def reduce(self, axes: tuple[str, ...],
             reduce_grads: Callable[[Any], Any]) -> 'Sums':
    """Every device's totals summed over the mesh ``axes``, once.

    ``reduce_grads`` sums the gradients into their own sharding (a ``psum``,
    or a ``psum_scatter`` for sharded parameters). Stacked aux becomes the
    per-micro-batch weighted mean over the devices (``aux_weights`` then
    the weights summed over the devices); per-row aux stays with its rows.
    """
    aux, total = self.aux, None
    if self.aux_weights is not None:
      total = _psum(self.aux_weights, axes)
      aux = jax.tree.map(
          lambda a: _weighted_mean(a, self.aux_weights, total, axes)
          if _floating(a) else _reduce_leaf(a, axes), aux)
    elif aux is not None:
      aux = jax.tree.map(lambda a: _reduce_leaf(a, axes), aux)
    weight = _psum(self.weight, axes)
    safe = jnp.where(weight == 0, 1, weight).astype(self.value.dtype)
    return Sums(
        grads=reduce_grads(self.grads),
        weight=weight,
        value=_psum(self.weight.astype(self.value.dtype) * self.value, axes)
        / safe,
        aux=aux,
        bad=None if self.bad is None else _psum(self.bad, axes),
        aux_weights=total,
        aux_rows=self.aux_rows,
        # Per-device scalars: they join the step's one reduction.
        noise=None if self.noise is None else jax.tree.map(
            lambda x: _psum(x, axes), self.noise),
    )

  def scaled(self, factor: float, summed: Any = None) -> 'Sums':
    """Every weighted total times ``factor`` (means, counts, summed and
    stacked aux kept)."""

    def scale(x):
      return x * jnp.asarray(factor, x.dtype)

    aux = self.aux
    if aux is not None and self.aux_weights is None:
      aux = jax.tree.map(
          lambda a, plain: scale(a) if _floating(a) and not plain else a, aux,
          _flags(summed, aux))
    return self._replace(grads=jax.tree.map(scale, self.grads),
                         weight=scale(self.weight), aux=aux)

  def joined(self, grads: Any) -> 'Sums':
    """The sums with a part-full window's gradient sum added."""
    return self._replace(
        grads=jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads,
                           self.grads))

  def finish(self, shapes: Shapes, has_aux: bool) -> Any:
    """The whole batch's value, or ``(value, aux)``: weighted means."""
    safe = jnp.where(self.weight > 0, self.weight, 1.0)
    value = self.value.astype(shapes.value.dtype)
    if not has_aux:
      return value
    if self.aux_rows is not None:
      return value, self.aux_rows
    if self.aux_weights is not None or self.aux is None:
      return value, self.aux

    def finish_aux(c, like, plain):
      if jnp.issubdtype(c.dtype, jnp.floating) and not plain:
        return (c / safe.astype(c.dtype)).astype(like.dtype)
      return c.astype(like.dtype) if plain else c

    return value, jax.tree.map(finish_aux, self.aux, shapes.aux,
                               _flags(shapes.summed, self.aux))


def rows_zeros(aux_like: Any, num_microbatches: int, axis: int) -> Any:
  """The per-row aux buffer: each leaf of one micro-batch's aux, whose axis
  ``axis`` has a row per row of the micro-batch, with that axis split into
  ``(rows, k)``. Micro-batch ``j`` fills index ``j`` of the ``k`` axis, so
  that :func:`rows_finish` puts the rows back in the batch's order with a
  free reshape."""

  def zeros(a):
    ax = axis % len(a.shape)
    shape = (*a.shape[:ax + 1], num_microbatches, *a.shape[ax + 1:])
    return jnp.zeros(shape, a.dtype)

  return jax.tree.map(zeros, aux_like)


def rows_add(rows: Any, aux: Any, index: jax.Array, axis: int) -> Any:
  """``rows`` with micro-batch ``index``'s aux written in place."""

  def put(buf, a):
    ax = axis % jnp.ndim(a)
    return jax.lax.dynamic_update_index_in_dim(
        buf, jnp.asarray(a, buf.dtype), index, ax + 1)

  return jax.tree.map(put, rows, aux)


def rows_finish(rows: Any, axis: int) -> Any:
  """The buffer of :func:`rows_zeros` as ``(..., B, ...)`` in row order."""

  def merge(buf):
    ax = axis % (buf.ndim - 1)
    return buf.reshape(*buf.shape[:ax], buf.shape[ax] * buf.shape[ax + 1],
                       *buf.shape[ax + 2:])

  return jax.tree.map(merge, rows)
