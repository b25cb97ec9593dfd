"""Device-varying types inside a ``shard_map``.

Inside a ``shard_map`` that is manual over some mesh axes, every value has a
type that says over which of them it varies from device to device. A loop
whose body adds a device-varying gradient to an invariant carry fails to
type-check, and differentiating with respect to an invariant (replicated)
value puts a ``psum`` in the backward pass. These helpers read and set that
type; outside manual axes they are no-ops.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from accum_jax import _compat


def varying_axes(x) -> frozenset:
  """The manual mesh axes over which ``x`` (array or ShapeDtypeStruct) varies."""
  aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  manual = getattr(aval, 'manual_axis_type', None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, 'vma', None) or ())  # None on jax 0.7.0


def to_varying(x, axes: tuple[str, ...]):
  """``x`` marked device-varying over ``axes`` (a no-op at run time)."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return _compat.pcast(x, missing, to='varying') if missing else x


def zeros_like_struct(like: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of ``like``'s shape and dtype, device-varying where it is."""
  zeros = jnp.zeros(like.shape, like.dtype)
  axes = tuple(varying_axes(like))
  return to_varying(zeros, axes) if axes else zeros


def match_carry(body: Callable[..., Any], init: Any) -> Any:
  """Makes a scan carry as device-varying as the body makes it.

  Outside any manual axes this returns ``init`` untouched, without tracing
  ``body``.
  """
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return init
  index = jax.ShapeDtypeStruct((), jnp.int32)
  for _ in range(4):  # a fixed point; each pass can only add varying axes
    out, _ = jax.eval_shape(body, init, index)
    new = jax.tree.map(lambda x, o: to_varying(x, tuple(varying_axes(o))),
                       init, out)
    if all(varying_axes(a) == varying_axes(b) for a, b in
           zip(jax.tree.leaves(new), jax.tree.leaves(init), strict=True)):
      return new
    init = new
  return init
