"""Which dtype a loss casts each parameter to, read from its jaxpr.

Under FSDP a parameter shard is all-gathered for each micro-batch. A loss
that computes in bfloat16 casts the gathered float32 parameter first, so the
float32 copy exists only to be cast. GSPMD, partitioning a hand-written loop,
gathers the bfloat16 copy instead (the cast commutes with the gather): half
the bytes moved and held. :func:`cast_dtypes` finds the parameters whose
only use in the loss is such a cast, so the mesh loop can gather them in the
narrower dtype too (:func:`accum_jax._sharding.scan`).
"""

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _narrowing(eqn, dtype) -> Any:
  """The dtype ``eqn`` casts to, when it is a floating cast narrower than
  ``dtype``; else None."""
  if eqn.primitive.name != 'convert_element_type':
    return None
  new = np.dtype(eqn.params['new_dtype'])
  if (jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(dtype, jnp.floating)
      and new.itemsize < np.dtype(dtype).itemsize
      and not eqn.params.get('weak_type', False)):
    return new
  return None


# Equations that move or re-lay a value without changing it: a cast after
# them is a cast of the parameter.
_MOVES = frozenset({'all_gather', 'pvary', 'copy', 'reshard',
                    'sharding_constraint', 'mesh_cast'})


def cast_dtypes(fn: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
  """A list, one entry per leaf of ``params``: the floating dtype that
  ``fn(params, *args, **kwargs)`` casts the leaf to as its one and only use
  (after gathers and other moves, each the only use of what it gets), or
  None.

  Only ``fn``'s own top-level equations count: a parameter passed whole to a
  nested call (a ``jit``-ed or rematerialized function) is not looked into.

  Example:
    >>> import jax.numpy as jnp
    >>> from accum_jax import _casts
    >>> p = {'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}
    >>> fn = lambda p, x: jnp.sum(x @ p['w'].astype(jnp.bfloat16)) + p['b'][0]
    >>> _casts.cast_dtypes(fn, p, jnp.ones((1, 2), jnp.bfloat16))
    [None, dtype(bfloat16)]
  """
  leaves, treedef = jax.tree.flatten(params)
  closed = jax.make_jaxpr(
      lambda *flat: fn(jax.tree.unflatten(treedef, flat), *args, **kwargs))(
          *leaves)
  jaxpr = closed.jaxpr
  uses = collections.defaultdict(list)
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if isinstance(v, jex_core.Var):
        uses[v].append(eqn)
  returned = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}

  def cast_of(v, dtype):
    while len(uses[v]) == 1 and v not in returned:
      (eqn,) = uses[v]
      if eqn.primitive.name not in _MOVES or len(eqn.outvars) != 1:
        return _narrowing(eqn, dtype)
      v = eqn.outvars[0]
    return None

  return [cast_of(v, jnp.result_type(leaf))
          for v, leaf in zip(jaxpr.invars, leaves, strict=True)]
