"""Checks on what users pass in, each raising a clear error at trace time.

Every public entry point validates its inputs here, so a bad input names the
argument, the leaf and the fix instead of failing deep inside a loop.
"""

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path) -> str:
  return jax.tree_util.keystr(path) or '<root>'


def is_array_like(x: Any) -> bool:
  """An array, a tracer, a ShapeDtypeStruct or a Python/NumPy number."""
  return hasattr(x, 'dtype') or isinstance(x, (bool, int, float, complex))


def check_floating(tree: Any, what: str) -> None:
  """Raises a TypeError naming the first non-floating leaf of ``tree``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_array_like(leaf):
      raise TypeError(
          f'{what} leaf {path_name(path)} is a {type(leaf).__name__} '
          f'({leaf!r:.60}), not an array: accum_jax differentiates pytrees of '
          'arrays. An Equinox module holds functions and other static '
          'leaves: use accum_jax.filter_value_and_grad(loss_fn, k) or '
          'accum_jax.filter_value_and_update(loss_fn, tx), which '
          'differentiate its eqx.is_inexact_array leaves as '
          'eqx.filter_value_and_grad does (or pass eqx.filter(model, '
          'eqx.is_inexact_array) and combine it with the rest inside your '
          'loss).'
      )
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f'{what} leaf {path_name(path)} has dtype {dtype}; accum_jax '
          'accumulates floating-point gradients only. Keep integer or boolean '
          'values out of the differentiated pytree (e.g. in a separate '
          'argument or a non-trainable collection).'
      )


def check_same_structure(tree: Any, reference: Any, what: str,
                         reference_what: str) -> None:
  """Raises a ValueError if ``tree`` and ``reference`` differ in structure."""
  treedef = jax.tree.structure(tree)
  ref_treedef = jax.tree.structure(reference)
  if treedef != ref_treedef:
    raise ValueError(
        f'The {what} pytree does not match the {reference_what} it was '
        f'initialised with:\n  {what}: {treedef}\n  {reference_what}: '
        f'{ref_treedef}'
    )
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree.leaves(reference)):
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f'The {what} leaf {path_name(path)} has shape {np.shape(a)} but '
          f'the {reference_what} has shape {np.shape(b)}.'
      )


def check_concrete_weight(weight: Any, what: str) -> None:
  """Raises for a negative weight known at trace time (traced ones count as 0)."""
  if isinstance(weight, jax.core.Tracer):
    return
  value = np.asarray(weight)
  if value < 0:
    raise ValueError(f'{what} must be >= 0, got {value.item()!r}.')


def check_weight(weight: Any, *, from_weight_fn: bool = False) -> jax.Array:
  """Returns ``weight`` as a float32 scalar, or raises if it is not a scalar.

  A concrete negative weight raises too (a traced one is clamped later).
  ``from_weight_fn`` words the errors for a ``weight_fn``'s output.
  """
  what = ('weight_fn must return a scalar weight per micro-batch'
          if from_weight_fn else 'A micro-batch weight must be a scalar')
  if not is_array_like(weight):
    raise TypeError(f'{what} (a number or 0-d array), got {weight!r:.60}.')
  if np.ndim(weight) != 0:
    raise ValueError(
        f'{what}, got an array of shape {np.shape(weight)}.'
    )
  check_concrete_weight(
      weight, 'The weight_fn weight' if from_weight_fn
      else 'A micro-batch weight')
  return jnp.asarray(weight, jnp.float32)


def check_num_microbatches(num_microbatches: Any) -> int:
  """Returns ``num_microbatches`` as an int, or raises a clear error."""
  if isinstance(num_microbatches, bool) or not isinstance(
      num_microbatches, int
  ):
    try:
      value = operator.index(num_microbatches)
    except TypeError:
      raise TypeError(
          'num_microbatches must be a Python int >= 1, got '
          f'{num_microbatches!r} of type {type(num_microbatches).__name__}.'
      ) from None
    if isinstance(num_microbatches, bool):
      raise TypeError(
          f'num_microbatches must be a Python int >= 1, got {num_microbatches!r}.'
      )
    num_microbatches = value
  if num_microbatches < 1:
    raise ValueError(
        f'num_microbatches must be >= 1, got {num_microbatches}.'
    )
  return num_microbatches


def check_accumulator_dtype(accumulator_dtype: Any) -> jnp.dtype | None:
  """A floating dtype (or None), else a TypeError naming the argument."""
  if accumulator_dtype is None:
    return None
  dtype = jnp.dtype(accumulator_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'accumulator_dtype must be a floating dtype, got {dtype}.'
    )
  return dtype


def check_no_functions(extra_args: dict[str, Any], who: str) -> None:
  """Refuses functions among a cross-step call's extra arguments.

  An inner optimizer that takes a function (sophia's ``obj_fn``, the line
  searches' ``value_fn``, sam's ``grad_fn``) evaluates it when the window
  ends: cross-step that is the last call's function, closed over the last
  micro-batch alone, and the inner state silently differs from the full
  batch's.
  """
  found = [name for name, value in extra_args.items()
           if any(callable(x) and not hasattr(x, 'shape')
                  for x in jax.tree.leaves(value, is_leaf=callable))]
  if found:
    raise TypeError(
        f'{who} got a function in its extra arguments {found}. Cross-step '
        'only the window-ending call\'s arguments reach the inner optimizer, '
        'so it would evaluate that function on the last micro-batch alone, '
        'not on the window. Use the in-step driver, which applies the inner '
        'optimizer once on the whole batch: accum_jax.value_and_update(loss_fn'
        ', tx)(params, opt_state, batch, inner_extra_args={'
        f'{found[0]!r}: a function of the whole batch}}).')
