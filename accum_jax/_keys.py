"""Random numbers drawn from a key that is the same in every micro-batch.

A dropout key captured by the loss's closure (or passed in an argument that
accum_jax does not fold) reaches every micro-batch unchanged, so each draws
the same mask: the accumulated step is not the full batch's, and nothing
fails. :func:`fixed_draws` finds such draws in the traced loss: a
``random_bits`` whose key depends on nothing that changes between
micro-batches (the micro-batch's index, the threaded state).
"""

from typing import Any

RANDOM = ('random_bits', 'threefry2x32')


def _subjaxprs(params: dict[str, Any]):
  for value in params.values():
    for x in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(getattr(x, 'jaxpr', None), 'eqns'):  # a ClosedJaxpr
        yield x.jaxpr
      elif hasattr(x, 'eqns') and hasattr(x, 'invars'):  # a Jaxpr
        yield x


def _walk(jaxpr: Any, varying_in: list[bool], found: list[str]) -> None:
  varies = dict(zip(jaxpr.invars, varying_in))

  def flag(v):
    return not hasattr(v, 'val') and varies.get(v, False)

  for eqn in jaxpr.eqns:
    ins = [flag(v) for v in eqn.invars]
    if eqn.primitive.name in RANDOM and ins and not ins[0]:
      found.append(eqn.primitive.name)
    for sub in _subjaxprs(eqn.params):
      aligned = len(sub.invars) == len(ins)
      _walk(sub, ins if aligned else [any(ins)] * len(sub.invars), found)
    out = any(ins)  # conservative: a mixed output counts as changing
    for v in eqn.outvars:
      varies[v] = out


def fixed_draws(closed_jaxpr: Any) -> list[str]:
  """The random draws of ``closed_jaxpr`` (every input of which changes
  between micro-batches) whose key does not change."""
  found = []
  _walk(closed_jaxpr.jaxpr, [True] * len(closed_jaxpr.jaxpr.invars), found)
  return found


MESSAGE = (
    'loss_fn draws random numbers from a PRNG key that is the same in every '
    'micro-batch (a key it closes over, or an old-style uint32 key in an '
    'argument other than rng=): every micro-batch gets the same dropout '
    'mask, unlike the full batch. Pass the key as the keyword rng= (folded '
    'with the micro-batch index), as a new-style jax.random.key in an '
    'argument, or in NNX an nnx.Rngs argument.')
