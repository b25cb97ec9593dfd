"""The accumulator of one micro-batch loop: ``init``, ``screen``, ``add``,
``finish``.

An :class:`Accumulator` knows everything a loop adds up and how a
micro-batch gets in: the gradient, weight, loss and aux sums
(:class:`accum_jax._sums.Sums`, the loop's carry), the non-finite policy and
skip predicate that screen a micro-batch, the noise scale's tally, and the
stacked or per-row aux. The loop body reads: gradient, then
:meth:`Accumulator.screen`, then :meth:`Accumulator.add` (compare
``optax.microbatching``'s ``Accumulator``: ``init``, ``update``,
``finalize``).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from accum_jax import _noise, _nonfinite, _sums


@dataclasses.dataclass(frozen=True)
class Accumulator:
  """What one loop adds up, and how a micro-batch enters the sums.

  Attributes:
    shapes: one micro-batch's outputs (abstract).
    num_microbatches: ``k``.
    dtype: the accumulator dtype (promoted with the gradients'), or None.
    nonfinite: the non-finite policy.
    weighted: whether the weights come from a ``weight_fn`` (else all 1).
    skip_fn: ``should_skip_update_fn``, asked for every micro-batch, or None.
    lazy_skip_step: under ``'skip_step'`` with no skip predicate, screen on
      the weight alone and read the gradients' finiteness from the window's
      sum (see :func:`accum_jax._nonfinite.screen`).
    check_grads: whether each micro-batch's gradient is checked for
      finiteness here (False: once, from the window's sum).
    noise_rows: with the noise scale's tally, a micro-batch's size in
      examples when it has no ``weight_fn`` (its rows); None for no tally.
    aux: ``'reduce'``, ``'stack'`` or ``'concat'`` (see
      :class:`accum_jax.LoopOptions`), or None without aux.
    aux_axis: with ``'concat'``, the aux leaves' row axis.
    summed: which reduced aux leaves are sums (``Shapes.summed``).
    prescaled: whether a gradient arrives already multiplied by its weight.
  """

  shapes: _sums.Shapes
  num_microbatches: int
  dtype: Any
  nonfinite: str = 'propagate'
  weighted: bool = False
  skip_fn: Any = None
  lazy_skip_step: bool = False
  check_grads: bool = True
  noise_rows: int | None = None
  aux: str | None = None
  aux_axis: int = 0
  prescaled: bool = False

  @property
  def screens(self) -> bool:
    """Whether a micro-batch's weight can differ from 1 (or it be dropped)."""
    return (self.weighted or self.nonfinite != 'propagate'
            or self.skip_fn is not None)

  def init(self, start: Any = None, skip_info: Any = None) -> _sums.Sums:
    """Empty sums; the gradient sum starts from ``start`` (a window left
    part-full, whose buffer is then the loop's carry), the skip predicate's
    info from ``skip_info``."""
    sums = _sums.Sums.zeros(
        self.shapes, self.dtype, reduce_aux=self.aux == 'reduce',
        count_bad=self.nonfinite != 'propagate', grads=start,
        noise=None if self.noise_rows is None else _noise.Tally.zeros())
    if self.aux == 'concat':
      sums = sums._replace(aux_rows=_sums.rows_zeros(
          self.shapes.aux, self.num_microbatches, self.aux_axis))
    return sums._replace(skip_info=skip_info)

  def screen(self, sums: _sums.Sums, micro: _sums.Micro, gradient_step: Any,
             params: Any) -> tuple[_sums.Micro, _sums.Sums, Any]:
    """``(micro, sums, dropped)``: what ``micro`` may add (the non-finite
    policy, and the skip predicate asked with ``gradient_step`` and
    ``params``, its info kept in ``sums``), and a bool scalar telling whether
    it was dropped (None when nothing can drop it)."""
    skip = None
    if self.skip_fn is not None:
      skip, info = _nonfinite.ask(self.skip_fn, micro.grads, gradient_step,
                                  params, sums.skip_info)
      sums = sums._replace(skip_info=info)
    if not self.screens:
      return micro, sums, None
    micro = _nonfinite.screen(self.nonfinite, micro, weighted=self.weighted,
                              lazy_skip_step=self.lazy_skip_step,
                              check_grads=self.check_grads, skip=skip)
    dropped = None if micro.bad is None else micro.bad > 0
    if skip is not None:
      dropped = skip if dropped is None else dropped | skip
    return micro, sums, dropped

  def add(self, sums: _sums.Sums, micro: _sums.Micro,
          index: jax.Array) -> tuple[_sums.Sums, Any]:
    """``(sums, stacked)``: the sums with micro-batch ``index`` added, and
    what the loop stacks for it (its aux and weight with ``'stack'``)."""
    if self.aux == 'concat':
      sums = sums._replace(aux_rows=_sums.rows_add(
          sums.aux_rows, micro.aux, index, self.aux_axis))
      micro = micro._replace(aux=None)
    stacked = (micro.aux, micro.weight) if self.aux == 'stack' else None
    added = sums.add(micro, self.shapes.summed)
    if self.noise_rows is not None:
      # The gradient's squared norm, taken with its add into the carry.
      scale = (micro.weight if micro.grad_scale is None
               else micro.grad_scale)
      sq = _noise.added_sq_norm(micro.grads, sums.grads, added.grads, scale)
      added = added._replace(noise=added.noise + _noise.piece(
          sq, micro.weight,
          micro.weight if self.weighted else self.noise_rows,
          prescaled=self.prescaled))
    return added, stacked

  def finish(self, sums: _sums.Sums, stacked: Any) -> _sums.Sums:
    """The sums after the last micro-batch, with the stacked aux and the
    per-row aux in the batch's row order."""
    if self.aux == 'stack':
      aux, weights = stacked
      sums = sums._replace(aux=aux, aux_weights=weights)
    if self.aux == 'concat':
      sums = sums._replace(aux_rows=_sums.rows_finish(sums.aux_rows,
                                                      self.aux_axis))
    return sums

  def grad_scale(self, weight: jax.Array) -> jax.Array | None:
    """The ``grad_scale`` of a micro-batch: 1 for a prescaled gradient (it
    carries its weight), else None (added with its weight)."""
    return jnp.ones_like(weight) if self.prescaled else None
