"""The options of a micro-batch loop, described once.

:class:`LoopOptions` is the one record of what a user may choose about the
loop (how the loss and its aux are read, how a micro-batch is weighted,
split and rematerialised, and where it runs on a mesh). Every driver and
helper takes the same options, as keywords or as one ``options=`` record,
and forwards the record unchanged, so a new option touches this module and
the code that reads it.
"""

import dataclasses
import inspect
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

AUX_CHOICES = ('mean', 'sum', 'stack', 'concat')

# Older keyword spellings of an option: name -> what replaces it.
_DEPRECATED = {
    'stack_aux': "aux='stack'",
    'concat_aux': "aux='concat'",
}


def _policies() -> dict[str, Any]:
  """The ``jax.checkpoint_policies`` that are policies (not factories)."""
  out = {}
  for name in dir(jax.checkpoint_policies):
    fn = getattr(jax.checkpoint_policies, name)
    try:
      first = next(iter(inspect.signature(fn).parameters), None)
    except (TypeError, ValueError):
      continue
    if first in ('prim', '_'):
      out[name] = fn
  return out


def remat_policy(remat: Any) -> Any:
  """``remat`` as None, True or a policy; also by the names the planner
  prints: ``'none'``, ``'full'``, a ``jax.checkpoint_policies`` policy name
  (``'dots_saveable'``) or ``'save_only_these_names(a, b)'``."""
  if not isinstance(remat, str):
    if remat is not None and not isinstance(remat, bool) and not callable(
        remat):
      raise TypeError(
          'remat must be None, True, a jax.checkpoint_policies policy or its '
          f'name; got {remat!r}.'
      )
    return remat
  names = _policies()
  if remat == 'none':
    return None
  if remat == 'full':
    return True
  if remat in names:
    return names[remat]
  match = re.fullmatch(r'save_only_these_names\((.*)\)', remat)
  if match:
    return jax.checkpoint_policies.save_only_these_names(
        *[n.strip() for n in match.group(1).split(',') if n.strip()])
  raise ValueError(
      f'remat={remat!r} is not a remat option; use None, True, a '
      'jax.checkpoint_policies policy, or one of the names '
      f"{['none', 'full', *sorted(names)]} or "
      "'save_only_these_names(name, ...)'."
  )


def check_unroll(unroll: Any) -> int | bool:
  """``unroll`` as ``lax.scan`` takes it: an int >= 1 or a bool."""
  if isinstance(unroll, (bool, np.bool_)):
    return bool(unroll)
  if not isinstance(unroll, (int, np.integer)):
    raise TypeError(
        'unroll must be an int >= 1 or a bool (True: unroll all micro-batches)'
        f', as lax.scan takes it; got {type(unroll).__name__}.'
    )
  if unroll < 1:
    raise ValueError(
        f'unroll must be >= 1 (1: a rolled loop, k or True: fully unrolled); '
        f'got {unroll}.'
    )
  return int(unroll)


def aux_choice(aux: Any, stack_aux: bool = False,
               concat_aux: bool = False) -> Any:
  """One ``aux=`` value from ``aux`` and the older ``stack_aux`` /
  ``concat_aux`` flags, checked."""
  if isinstance(aux, str) and aux not in AUX_CHOICES:
    raise ValueError(f"aux must be 'mean', 'sum', 'stack', 'concat' or a "
                     f"pytree prefix of 'mean' and 'sum', got {aux!r}.")
  if aux == 'stack' or aux == 'concat':
    if stack_aux or concat_aux:
      raise ValueError(f'aux={aux!r} with stack_aux= or concat_aux=: give '
                       'one of them.')
    return aux
  if aux != 'mean' and (stack_aux or concat_aux):
    raise ValueError(f'aux={aux!r} reduces the aux; stack_aux / concat_aux '
                     'return it per micro-batch or per row. Give one.')
  if stack_aux and concat_aux:
    raise ValueError('stack_aux=True and concat_aux=True exclude each other:'
                     ' pick one way to return the aux.')
  if stack_aux:
    return 'stack'
  if concat_aux:
    return 'concat'
  if not isinstance(aux, str):
    leaves = jax.tree.leaves(aux)
    if not leaves or any(x not in ('mean', 'sum') for x in leaves):
      raise ValueError("aux as a pytree holds 'mean' or 'sum' leaves, one "
                       f"per aux leaf or subtree; got {aux!r}.")
  return aux


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """The options of a micro-batched loss, shared by every driver and helper.

  :func:`value_and_grad`, :func:`value_and_update`, :func:`linen_train_step`,
  :func:`nnx_train_step`, :func:`filter_value_and_grad` and
  :func:`filter_value_and_update` take these as keywords, or all at once as
  ``options=LoopOptions(...)`` (keywords given beside it replace its
  fields; for :func:`nnx_train_step`, whose other keywords reach the loss,
  ``options=`` takes them all). See :func:`value_and_grad` for what each
  one does to the result.

  Attributes:
    has_aux: whether the loss returns ``(loss, aux)``.
    weight_fn: ``weight_fn(microbatch) -> scalar`` weight of a micro-batch
      (e.g. its count of real tokens with a token-mean loss), or None (1).
      With several batched arguments it takes one micro-batch of each,
      positional ones first (the Equinox helpers: the tuple of them).
    aux: how the aux is combined over micro-batches: ``'mean'`` (the
      default: floating leaves are weighted means like the loss, integer
      leaves summed, booleans OR-ed), ``'sum'`` (floating leaves summed,
      for sums over the batch's rows or tokens), a pytree prefix of
      ``'mean'`` and ``'sum'`` (e.g. ``{'loss_sum': 'sum', 'acc':
      'mean'}``), ``'stack'`` (each micro-batch's aux, leading axis ``k``)
      or ``'concat'`` (every row's aux in the batch's row order; every leaf
      holds one entry per row). Replaces ``stack_aux=True`` /
      ``concat_aux=True``, which still work and warn.
    remat: ``None`` (no rematerialisation), ``True`` (``jax.checkpoint`` the
      per-micro-batch loss), a ``jax.checkpoint_policies`` policy, or its
      name as the planner prints it (``'dots_saveable'``).
    unroll: micro-batches per iteration of the loop, as ``lax.scan``'s
      ``unroll=``: an int >= 1, or True for all ``k`` (no loop). The numbers
      are the same; an unrolled loop keeps the activations of ``unroll``
      micro-batches live at once. Worth it on XLA:CPU with convolutions; on
      GPU and TPU leave it at 1 (``docs/unroll.md``).
    per_example_fn: a function of one example's gradient returning a
      gradient of the same structure and shapes (e.g. clipping to a norm for
      DP-SGD), applied to every example's gradient inside its micro-batch;
      or None.
    batch_argnums: the positions of the batched arguments among the loss's
      positional arguments, counting the differentiated one (the params, the
      model) as 0, as ``optax.microbatching.microbatch``'s ``argnums``. None
      gives each helper's default: the argument after the params
      (``value_and_grad``, ``value_and_update``), the ``batch`` argument as
      the second (``nnx_train_step``; a tuple of positions takes a tuple
      ``batch``), every positional argument after the model (the Equinox
      helpers). Replaces ``batch_argnum=`` (``nnx_train_step``) and
      ``argnums=`` (the Equinox helpers), which still work and warn.
    batch_argnames: the names of batched keyword arguments
      (``value_and_grad``, ``value_and_update``).
    in_axes: the batch axis of each batched argument: an int for all, or
      (``value_and_grad``, ``value_and_update``) one per argument of
      ``batch_argnums`` then ``batch_argnames``. Axes other than 0 are split
      on one device; on a mesh the batch axis must lead.
    mesh: the mesh to split the loop over; by default the mesh set with
      ``jax.set_mesh``, or the one carried by the batch's sharding.
    axis_name: the batch axes (a mesh axis name or a tuple of them); by
      default the axes sharding the batch's leading dimension where that is
      known: for explicit mesh axes, or for a concrete batch outside
      ``jit``. Pass it under ``jit`` on a mesh with ``AxisType.Auto`` axes
      (a warning at trace time names the fix), or inside a ``shard_map``
      that is manual over these axes. ``()`` runs the loop unsplit and
      leaves the reductions to the partitioner.
    fsdp_reduce: ``'per_microbatch'`` (the default) or ``'per_step'``: when
      gradients of parameters sharded over a batch axis are
      reduce-scattered.
    param_specs: on a mesh whose batch axes are ``AxisType.Auto``, the
      parameters' shardings, which their types under ``jit`` do not carry:
      a ``PartitionSpec`` (or ``NamedSharding``) for all, or a pytree of
      them like the params (e.g. the ``in_shardings`` given to ``jit``).
      Without it such parameters enter the per-device loop replicated over
      the batch axes, and a warning says so; ``P()`` declares them
      replicated. Under Explicit axes they are read from the types.

  Examples:
    >>> import jax.numpy as jnp
    >>> import accum_jax
    >>> options = accum_jax.LoopOptions(has_aux=True, aux='sum')
    >>> def loss_fn(w, x):
    ...   return jnp.mean(x @ w), {'rows': jnp.sum(jnp.ones(x.shape[0]))}
    >>> f = accum_jax.value_and_grad(loss_fn, 4, options=options)
    >>> (loss, aux), grads = f(jnp.ones(2), jnp.ones((8, 2)))
    >>> float(aux['rows'])
    8.0
  """

  has_aux: bool = False
  weight_fn: Callable[..., Any] | None = None
  aux: Any = 'mean'
  remat: Any = None
  unroll: int | bool = 1
  per_example_fn: Callable[[Any], Any] | None = None
  batch_argnums: int | Sequence[int] | None = None
  batch_argnames: str | Sequence[str] = ()
  in_axes: int | Sequence[int] = 0
  mesh: Any = None
  axis_name: Any = None
  fsdp_reduce: str = 'per_microbatch'
  param_specs: Any = None

  def __post_init__(self):
    object.__setattr__(self, 'aux', aux_choice(self.aux))
    object.__setattr__(self, 'remat', remat_policy(self.remat))
    object.__setattr__(self, 'unroll', check_unroll(self.unroll))
    if self.concat_aux and not self.has_aux:
      raise ValueError("aux='concat' returns the aux of every row; it needs"
                       ' has_aux=True.')
    if self.per_example_fn is not None and not callable(self.per_example_fn):
      raise TypeError('per_example_fn must be a function of one example\'s '
                      f'gradient, got {self.per_example_fn!r}.')

  @property
  def stack_aux(self) -> bool:
    """Whether each micro-batch's aux is returned stacked."""
    return isinstance(self.aux, str) and self.aux == 'stack'

  @property
  def concat_aux(self) -> bool:
    """Whether every row's aux is returned in the batch's row order."""
    return isinstance(self.aux, str) and self.aux == 'concat'

  @property
  def aux_modes(self) -> Any:
    """How reduced aux leaves combine: ``'mean'``, ``'sum'`` or a prefix."""
    return 'mean' if self.stack_aux or self.concat_aux else self.aux


DEFAULT = LoopOptions()
FIELDS = frozenset(f.name for f in dataclasses.fields(LoopOptions))


def make(options: LoopOptions | None = None, *, who: str,
         **given: Any) -> LoopOptions:
  """``options`` (default: every default) with the keywords ``given``
  replacing its fields; the older ``stack_aux`` / ``concat_aux`` flags
  become ``aux``. Unknown names get a ``TypeError`` listing the options."""
  if options is None:
    options = DEFAULT
  elif not isinstance(options, LoopOptions):
    raise TypeError(f'{who}: options must be an accum_jax.LoopOptions, got '
                    f'{type(options).__name__}.')
  unknown = sorted(set(given) - FIELDS - set(_DEPRECATED))
  if unknown:
    raise TypeError(
        f'{who} got unexpected keyword argument(s) {unknown}; its loop '
        f'options are {sorted(FIELDS)} (see accum_jax.LoopOptions).')
  flags = {name: given.pop(name) for name in _DEPRECATED if name in given}
  for name in flags:
    warnings.warn(f'{who}: {name}= is deprecated; use {_DEPRECATED[name]}.',
                  DeprecationWarning, stacklevel=3)
  if any(flags.values()):
    aux = given.pop('aux', options.aux)
    given['aux'] = aux_choice(aux, flags.get('stack_aux', False),
                              flags.get('concat_aux', False))
  if not given:
    return options
  return dataclasses.replace(options, **given)


def renamed(given: dict[str, Any], old: str, new: str, who: str) -> None:
  """Moves the deprecated keyword ``old`` of ``given`` to ``new``, with a
  ``DeprecationWarning``; both at once are an error."""
  if old not in given:
    return
  if new in given:
    raise TypeError(f'{who}: {old}= and {new}= name the same option; give '
                    f'{new}= alone.')
  warnings.warn(f'{who}: {old}= is deprecated; use {new}=.',
                DeprecationWarning, stacklevel=3)
  given[new] = given.pop(old)


def split(kwargs: Mapping[str, Any], extra: Sequence[str] = ()
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(options, rest)``: the keywords of ``kwargs`` that name a loop option
  (or one of ``extra``), and the others."""
  names = FIELDS | set(_DEPRECATED) | set(extra)
  ours = {n: v for n, v in kwargs.items() if n in names}
  return ours, {n: v for n, v in kwargs.items() if n not in names}


def declared(fn: Callable[..., Any], name: str) -> bool:
  """Whether ``fn`` names a parameter ``name`` that a keyword can fill."""
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  p = parameters.get(name)
  return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                      p.KEYWORD_ONLY)


def one_axis(options: LoopOptions, who: str) -> int:
  """``options.in_axes`` for a helper whose batch is split along one axis."""
  axes = options.in_axes
  if isinstance(axes, bool) or not isinstance(axes, (int, np.integer)):
    raise TypeError(f'{who} splits its batch along one axis: in_axes must be '
                    f'an int, got {axes!r}.')
  return int(axes)


def refuse(options: LoopOptions, who: str, names: Sequence[str],
           why: str) -> None:
  """A ``TypeError`` for options ``names`` set on a helper that has no use
  for them."""
  set_ = [n for n in names
          if getattr(options, n) != getattr(DEFAULT, n)]
  if set_:
    raise TypeError(f'{who} does not take {", ".join(n + "=" for n in set_)}:'
                    f' {why}')
