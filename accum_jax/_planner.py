"""Ahead-of-time memory figures, and a planner that picks ``k``, remat and
unrolling.

Everything here compiles ahead (``jax.jit(...).lower(...).compile()``) and
reads XLA's own figures; nothing is ever run. The peak of a compiled step is

  argument + output + temporaries - aliased

bytes from ``memory_analysis()``: with the params and optimizer state donated
(``donate_argnums``), the aliased outputs are counted once. This is the figure
the benchmarks report, so a plan's estimate is the benchmark's number.
"""

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from accum_jax import _checks, _options, _placement, _targets


class CompiledMemory(NamedTuple):
  """What XLA reports for one compiled function.

  Attributes:
    argument_bytes: bytes of the arguments (the batch, params, state...).
    output_bytes: bytes of the outputs.
    temp_bytes: bytes of the temporaries (activations, loop carries...).
    alias_bytes: bytes of outputs written into donated argument buffers.
    peak_bytes: ``argument + output + temp - alias``.
    flops: the flops of one call, loop trip counts included: XLA's compiled
      ``cost_analysis()`` counts a loop body once, so every ``while`` loop
      whose trip count XLA knows (``scan``, ``fori_loop``, the micro-batch
      loop) has its body and condition counted as many times as it runs,
      each costed by XLA's own analysis (see :func:`compiled_memory`).
      ``nan`` when the backend reports no flops (XLA:GPU for compile-only
      devices). For a TPU target's compile-only devices each loop body
      counts once, as XLA counts it: compare flops there only between steps
      with the same loops (the planner compares remat options at one
      ``k``). Where a loop body cannot be
      costed (a jaxlib without the private HLO functions this uses), a
      warning says so and the figure counts each body once, as XLA does.
    compile_seconds: wall time of ``lower(...).compile()``.
  """

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  peak_bytes: int
  flops: float
  compile_seconds: float


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return math.nan
  return float(cost['flops'])


# The optimized HLO text: a computation's header, and the references an
# instruction makes to other computations.
_HEADER = re.compile(r'(ENTRY\s+)?%?([A-Za-z_][\w.\-]*)\s*\(.*\{\s*$')
_NAME = r'%?([A-Za-z_][\w.\-]*)'
_WHILE = re.compile(r'\swhile\(.*\bcondition=' + _NAME + r'.*\bbody=' + _NAME)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BRANCHES = re.compile(r'\bbranch_computations=\{([^}]*)\}|'
                       r'\b(?:true|false)_computation=' + _NAME)
_CALLS = re.compile(r'\b(?:calls|to_apply)=' + _NAME
                    + r'|\bcalled_computations=\{([^}]*)\}')


def _names(group: str | None) -> list[str]:
  return [n.strip().lstrip('%') for n in (group or '').split(',') if n.strip()]


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
  """The instruction lines of each computation of an HLO module's text, and
  the name of its entry computation."""
  computations, entry, current = {}, None, None
  for line in text.split('\n'):
    if line.startswith((' ', '\t')):
      if current is not None:
        computations[current].append(line)
    elif line.startswith('}'):
      current = None
    elif (header := _HEADER.match(line)) is not None:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
  return computations, entry


def _hlo_cost_functions():
  """jaxlib's ``(hlo_module_from_text, hlo_module_cost_analysis)``: private
  names, looked up where each supported jaxlib keeps them."""
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  xla = getattr(xla_client, '_xla', None)
  parse = getattr(xla, 'hlo_module_from_text', None)
  if parse is None:
    from jaxlib import _hlo  # pylint: disable=g-import-not-at-top
    parse = _hlo.hlo_module_from_text
  return parse, xla.hlo_module_cost_analysis


def _loop_flops(compiled, flops_once: float) -> float:
  """``flops_once`` (XLA's figure, each loop body counted once) with every
  loop of known trip count ``n`` counted ``n`` times.

  XLA costs a ``while`` as one pass of its body and condition, and a
  conditional as its costliest branch. For a computation ``C`` the exact
  figure is ``xla(C) + extra(C)``, where a loop of ``n`` trips in ``C`` adds
  ``n * exact(body) - xla(body) + n * xla(condition)`` (the condition runs
  ``n + 1`` times) and a call adds its callee's ``extra``. ``xla(B)`` of a
  body is XLA's own cost analysis of the module re-rooted at ``B``, so each
  instruction is costed as XLA costs it in place. A loop whose trip count
  XLA does not know counts once (its inner loops are still scaled).
  """
  text = compiled.as_text()
  if _WHILE.search(text) is None:
    return flops_once
  computations, entry = _computations(text)
  if entry is None:
    raise ValueError('no ENTRY computation found in the HLO text')
  client = getattr(compiled.runtime_executable(), 'client', None)
  if client is None:  # a compile-only device (a target): nothing to cost on
    return flops_once
  parse, analyse = _hlo_cost_functions()
  lines = text.split('\n')
  xla_costs, extras = {}, {}

  def xla(name):
    # The same module with ``name`` as its entry computation.
    if name not in xla_costs:
      rooted = ['HloModule rooted']
      for line in lines[1:]:
        header = _HEADER.match(line)
        if header is not None:
          if header.group(1):
            line = line[header.end(1):]
          if header.group(2) == name:
            line = 'ENTRY ' + line
        rooted.append(line)
      cost = analyse(client, parse('\n'.join(rooted)))
      xla_costs[name] = float(cost.get('flops', 0.0))
    return xla_costs[name]

  def extra(name):
    if name in extras:
      return extras[name]
    extras[name] = 0.0  # a cycle (none in valid HLO) adds nothing
    total = 0.0
    for line in computations.get(name, ()):
      if (loop := _WHILE.search(line)) is not None:
        condition, body = loop.groups()
        trips = _TRIPS.search(line)
        if trips is None:
          total += extra(body)
        else:
          n = int(trips.group(1))
          total += (n * (xla(body) + extra(body)) - xla(body)
                    + n * xla(condition))
        continue
      branches = [n for m in _BRANCHES.finditer(line)
                  for n in _names(m.group(1)) + _names(m.group(2))]
      if branches:
        if any(extra(b) for b in branches):
          total += (max(xla(b) + extra(b) for b in branches)
                    - max(xla(b) for b in branches))
        continue
      for m in _CALLS.finditer(line):
        for callee in _names(m.group(1)) + _names(m.group(2)):
          total += extra(callee)
    extras[name] = total
    return total

  return flops_once + extra(entry)


def _step_flops(compiled) -> float:
  flops = _flops(compiled)
  if math.isnan(flops):
    return flops
  try:
    return _loop_flops(compiled, flops)
  except Exception as e:  # a jaxlib without these private names, a new format
    warnings.warn(
        f'accum_jax could not count the loop trip counts in the flops ({e!r}); '
        'CompiledMemory.flops counts each loop body once, as XLA does, so '
        'compare it only between steps with the same loops.', stacklevel=3)
    return flops


def compiled_memory(
    fn: Callable[..., Any],
    *args: Any,
    donate_argnums: Sequence[int] | int = (),
    static_argnums: Sequence[int] | int = (),
    **kwargs: Any,
) -> CompiledMemory:
  """Compiles ``fn(*args, **kwargs)`` ahead and returns its memory figures.

  ``flops`` is the work of one call: XLA's ``cost_analysis()`` counts the
  body of a ``while`` loop once, so each loop whose trip count XLA knows
  (``lax.scan``, ``fori_loop`` with static bounds, nested ones too) is
  counted as many times as it runs, its body costed by the same analysis
  (see :attr:`CompiledMemory.flops`).

  Args:
    fn: the function to compile (a plain function or a ``jax.jit`` one), or
      an already compiled ``jax.stages.Compiled`` (then pass no arguments;
      ``compile_seconds`` is ``nan``).
    *args: example arguments: arrays or ``jax.ShapeDtypeStruct``\\ s.
    donate_argnums: the positional arguments whose buffers are donated (e.g.
      the params and optimizer state of a train step).
    static_argnums: positional arguments that are static.
    **kwargs: example keyword arguments.

  Returns:
    A :class:`CompiledMemory`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import accum_jax
    >>> x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    >>> m = accum_jax.compiled_memory(lambda x: x * 2.0, x, donate_argnums=0)
    >>> m.peak_bytes  # input and output share one donated buffer
    262144
    >>> w = jnp.ones((256, 256))
    >>> ten = lambda x: jax.lax.fori_loop(0, 10, lambda i, h: h @ w, x)
    >>> flops = accum_jax.compiled_memory(ten, x).flops
    >>> round(flops / (2 * 256**3), 4)  # ten matmuls (XLA alone says one)
    10.0
  """
  if isinstance(fn, jax.stages.Compiled):
    if args or kwargs:
      raise TypeError(
          'compiled_memory got a compiled function and example arguments; '
          'pass either a function and its arguments, or a Compiled alone.'
      )
    compiled, seconds = fn, math.nan
  else:
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums,
                       static_argnums=static_argnums).lower(
                           *args, **kwargs).compile()
    seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(
        f'The {jax.default_backend()} backend gives no memory_analysis() for '
        'compiled functions, so no peak memory can be estimated.'
    )
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return CompiledMemory(
      argument_bytes=int(stats.argument_size_in_bytes),
      output_bytes=int(stats.output_size_in_bytes),
      temp_bytes=int(stats.temp_size_in_bytes),
      alias_bytes=int(stats.alias_size_in_bytes),
      peak_bytes=int(peak),
      flops=_step_flops(compiled),
      compile_seconds=seconds,
  )


class PlanCandidate(NamedTuple):
  """One ``(k, remat[, unroll])`` the planner compiled.

  Attributes:
    num_microbatches: ``k``.
    remat: the remat option passed to ``make_step``.
    peak_bytes: the compiled peak (see :func:`compiled_memory`).
    flops: the step's flops, loop trip counts included (see
      :attr:`CompiledMemory.flops`): recomputation shows up here, and the
      same work split into more micro-batches or unrolled differently
      counts about the same.
    fits: whether ``peak_bytes <= budget_bytes``.
    memory: the full :class:`CompiledMemory`, or ``None`` where the
      target's compiler refused the step for needing more than the device's
      memory (XLA:TPU does); ``peak_bytes`` is then what it said the step
      needs at least.
    unroll: the unroll option passed to ``make_step``, or ``None`` when the
      planner was given no ``unroll`` options.
  """

  num_microbatches: int
  remat: Any
  peak_bytes: int
  flops: float
  fits: bool
  memory: CompiledMemory
  unroll: Any = None


class MemoryPlan(NamedTuple):
  """The plan chosen by :func:`plan_microbatches`.

  Attributes:
    num_microbatches: the chosen ``k``, the smallest that fits (found by
      bisection, see :func:`plan_microbatches`).
    remat: the chosen remat option: among those that fit at that ``k``, the
      one with the fewest flops (least recomputation).
    peak_bytes: the chosen step's compiled peak.
    flops: the chosen step's flops, loop trip counts included.
    budget_bytes: the budget the plan was made for.
    candidates: every :class:`PlanCandidate` compiled, by increasing ``k``
      (then in the order of the options).
    unroll: the chosen unroll option: among those that fit with the chosen
      remat, the largest (fewest loop iterations); ``None`` when the planner
      was given no ``unroll`` options.
    skipped: the candidate ``k`` the bisection did not compile, increasing.
    target: the line describing the target planned for (its devices, their
      memory and the budget), or ``None`` for the device at hand.
  """

  num_microbatches: int
  remat: Any
  peak_bytes: int
  flops: float
  budget_bytes: int
  candidates: tuple[PlanCandidate, ...]
  unroll: Any = None
  skipped: tuple[int, ...] = ()
  target: str | None = None

  def table(self) -> str:
    """The candidates as a fixed-width text table, a ``skipped`` row for
    each ``k`` not compiled; peaks are per device."""
    return _table(self.candidates, self.budget_bytes, self, self.skipped,
                  self.target)

  def __str__(self) -> str:
    return self.table()


class PlanDoesNotFit(ValueError):
  """No candidate of :func:`plan_microbatches` fits the budget.

  Attributes:
    candidates: every :class:`PlanCandidate` compiled (the largest ``k``
      among them); the smallest is ``min(candidates, key=peak_bytes)``.
    budget_bytes: the budget none of them fits.
    target: the line describing the target, or ``None``.
  """

  def __init__(self, message: str, candidates: tuple[PlanCandidate, ...],
               budget_bytes: int, target: str | None):
    super().__init__(message)
    self.candidates = candidates
    self.budget_bytes = budget_bytes
    self.target = target

  @property
  def smallest(self) -> PlanCandidate:
    """The candidate with the lowest peak."""
    return min(self.candidates, key=lambda c: c.peak_bytes)


def device_memory_budget(device: jax.Device | None = None) -> int | None:
  """The device's reported memory capacity in bytes, or ``None`` if unknown.

  Reads ``bytes_limit`` from ``device.memory_stats()`` (GPU and TPU report it;
  the CPU backend reports nothing).
  """
  device = jax.devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # a backend without memory stats raises
    return None
  if not stats or 'bytes_limit' not in stats:
    return None
  return int(stats['bytes_limit'])


def remat_name(remat: Any) -> str:
  """A short printable name for a remat option."""
  if remat is None or remat is False:
    return 'none'
  if remat is True:
    return 'full'
  names = getattr(remat, 'saveable_names', None)  # save_only_these_names
  if names is not None:
    return f'save_only_these_names({", ".join(sorted(names))})'
  return getattr(remat, '__name__', None) or repr(remat)


def unroll_name(unroll: Any) -> str:
  """A short printable name for an unroll option."""
  if unroll is True:
    return 'full'
  return str(int(unroll))


def _mib(n: float) -> str:
  return f'{n / 2**20:.2f} MiB'


def _table(candidates, budget, chosen=None, skipped=(), target=None) -> str:
  unrolled = any(c.unroll is not None for c in candidates)
  head = f'  {"unroll":>6}' if unrolled else ''
  lines = [target] if target else []
  lines.append(f'{"k":>4}  {"remat":<36}{head}  {"peak":>14}  {"GFLOP":>10}  '
               f'fits   (budget {_mib(budget)})')
  rows = [(c.num_microbatches, 0, c) for c in candidates]
  rows += [(k, 1, None) for k in skipped]
  for k, _, c in sorted(rows, key=lambda row: row[:2]):
    if c is None:  # a k the bisection did not compile
      column = f'  {"-":>6}' if unrolled else ''
      lines.append(f'{k:>4}  {"-":<36}{column}  {"skipped":>14}  '
                   f'{"-":>10}  -')
      continue
    mark = ''
    if (chosen is not None and c.num_microbatches == chosen.num_microbatches
        and c.remat is chosen.remat
        and (type(c.unroll), c.unroll) == (type(chosen.unroll), chosen.unroll)):
      mark = '  <- chosen'
    column = f'  {unroll_name(c.unroll):>6}' if unrolled else ''
    peak = _mib(c.peak_bytes) if c.memory is not None else (
        f'>{_mib(c.peak_bytes)}')  # refused by the compiler
    flops = '-' if math.isnan(c.flops) else f'{c.flops / 1e9:.3f}'
    lines.append(
        f'{c.num_microbatches:>4}  {remat_name(c.remat):<36}{column}  '
        f'{peak:>14}  {flops:>10}  '
        f'{"yes" if c.fits else "no":<4}{mark}')
  if skipped:
    lines.append('skipped: not compiled (the bisection over k assumes the '
                 'peak falls as k grows)')
  return '\n'.join(lines)


_REFUSED = re.compile(r'RESOURCE_EXHAUSTED: .*?required for .*?\(([\d.]+)([KMGT])\)')


def _refused(error: Exception) -> int | None:
  """The bytes a program needs, from a compiler's refusal to compile it
  for a device with less memory (XLA:TPU's 'Ran out of memory on HBM'), or
  ``None`` for any other error."""
  found = _REFUSED.search(str(error))
  if found is None:
    return None
  size, unit = found.groups()
  return int(float(size) * 2 ** (10 * ' KMGT'.index(unit)))


def _trips(k: int, unroll: Any) -> int:
  """Iterations of the loop of ``k`` micro-batches unrolled ``unroll``
  times (1 when no unroll option was given)."""
  if unroll is None or unroll is True:
    return 1
  return -(-k // max(int(unroll), 1))


def _choose(tried: list[PlanCandidate]) -> PlanCandidate | None:
  """Among the candidates of one ``k`` that fit: the least recomputation
  (fewest flops among those with the same unroll, so that the few flops an
  unrolled loop saves or adds never outweigh a remat option), then the
  fewest loop iterations, then the listed order."""

  def flops(c):
    return math.inf if math.isnan(c.flops) else c.flops

  def key(item):
    index, c = item
    trips = _trips(c.num_microbatches, c.unroll)
    same = [o for o in tried if _trips(o.num_microbatches, o.unroll) == trips]
    rank = sum(flops(o) < flops(c) for o in same)
    return rank, trips, index

  fits = [(i, c) for i, c in enumerate(tried) if c.fits]
  return min(fits, key=key)[1] if fits else None


def _leading_size(tree: Any, argnum: int) -> int:
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree) if np.ndim(x) > 0}
  if len(sizes) != 1:
    raise ValueError(
        f'Argument {argnum} (batch_argnum) must be a pytree whose leaves share '
        f'a leading batch axis; found leading sizes {sorted(sizes)}.'
    )
  (size,) = sizes
  if size < 1:
    raise ValueError(
        f'Argument {argnum} (batch_argnum) is a batch of 0 rows; the planner '
        'needs an example batch of the size you will train with.'
    )
  return size


def plan_microbatches(
    make_step: Callable[[int, Any], Callable[..., Any]],
    *args: Any,
    batch_argnum: int,
    donate_argnums: Sequence[int] | int = (),
    budget_bytes: int | None = None,
    num_microbatches: Sequence[int] | None = None,
    remat: Sequence[Any] = (None, True),
    print_fn: Callable[[str], Any] | None = print,
    unroll: Sequence[Any] | None = None,
    target: 'str | _targets.Target | None' = None,
    mesh_axes: str | Sequence[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    in_specs: Sequence[Any] | None = None,
    headroom: float | None = None,
    search: str = 'bisect',
    **kwargs: Any,
) -> MemoryPlan:
  """Picks the fewest micro-batches (and cheapest remat) whose step fits.

  For a candidate ``k`` (by default every divisor of the batch size) and
  each option in ``remat``, compiles ``make_step(k, remat_option)`` ahead on
  ``args`` and reads its peak memory (:func:`compiled_memory`: argument +
  output + temporaries - aliased); ``k`` fits if one of its options does.
  The smallest ``k`` that fits wins; among the options that fit at that
  ``k``, the one with the fewest flops (the least recomputation) is chosen,
  ties going to the earlier option. The step is never run, so ``args`` can
  be ``jax.ShapeDtypeStruct``\\ s.

  Compiling a large model takes minutes, so the candidates are searched by
  bisection: about ``log2(n) + 1`` of ``n`` candidate ``k`` are compiled,
  and the table shows the others as ``skipped`` (:attr:`MemoryPlan.skipped`).
  This assumes the peak falls as ``k`` grows (smaller micro-batches, smaller
  activations), which holds for the divisors of the batch size on the
  models measured. Where it does not, the plan is still sound but maybe not
  the smallest: the chosen ``k`` fits, and the next smaller candidate was
  compiled and does not fit (or the chosen ``k`` is the smallest candidate).
  Pass ``num_microbatches=[k]`` to compile one ``k`` alone, or
  ``search='all'`` to compile every candidate and get the smallest ``k``
  that fits whatever the peaks do (on XLA:GPU a small step's peak can rise
  from one ``k`` to the next).

  With ``unroll`` options, every ``(remat, unroll)`` pair is compiled at each
  ``k`` with ``make_step(k, remat_option, unroll_option)``. An unrolled loop
  holds several micro-batches' activations at once (more memory, same flops)
  and is faster where a rolled loop is slow (convolutions on XLA:CPU). Among
  the pairs that fit at the chosen ``k``: the least recomputation first
  (remat options compared by flops at the same unroll), then the largest
  unroll (the fewest loop iterations), then the listed order. The planner
  never trades recomputation, a cost on every backend, for unrolling, whose
  gain depends on the backend; pass only the remat options you accept.

  With ``target``, the step is compiled by that accelerator's own compiler
  for its compile-only devices (:func:`load_target`: a TPU topology, an
  H100, A100 or L4 host, any GPU by its description), on this machine,
  without one: the peak is per device, held against the device's memory
  less the target's headroom. On several devices the batch is split over
  ``mesh_axes`` and each argument is laid out by ``in_specs``: data
  parallel by default (everything else replicated), FSDP with the params'
  and optimizer state's specs, 2-D with ``mesh=``. ``make_step`` builds the
  step as it will train on that mesh. XLA:GPU reports no flops for
  compile-only devices, so on a GPU target the remat options that fit are
  taken in the order given. XLA:TPU refuses to compile a step over the
  device's memory: that candidate does not fit, at the size it said. See
  ``docs/planning.md`` for what a compile-only plan cannot see.

  Args:
    make_step: ``make_step(num_microbatches, remat)`` returning a train step,
      e.g. one built with :func:`accum_jax.value_and_update` on
      ``accumulate(inner, num_microbatches)`` with ``remat=remat``. Its state
      structure must not depend on ``k`` (an :class:`AccumulateState` does
      not), so the same example ``args`` serve every ``k``.
    *args: example arguments of the step (arrays or ``ShapeDtypeStruct``).
    batch_argnum: the position of the batch in ``args``; its leaves' shared
      leading size is the batch size.
    donate_argnums: the donated arguments, as the step is jitted in training
      (typically the params and optimizer state).
    budget_bytes: the memory budget; by default the device's reported capacity
      (:func:`device_memory_budget`), which the CPU backend does not report.
    num_microbatches: the ``k`` to try; by default the divisors of the batch
      size. Each must divide it.
    remat: the remat options to try at each ``k`` (``None``, ``True`` or
      ``jax.checkpoint_policies`` policies), in order of preference; every
      option is compiled at each ``k`` the bisection visits.
    print_fn: prints the table of candidates; ``None`` to stay quiet.
    unroll: the unroll options to try at each ``k`` (ints >= 1 or ``True``,
      as ``lax.scan`` takes them), passed to ``make_step`` as a third
      argument; ``None`` (the default) calls ``make_step(k, remat)``.
    target: the accelerator to plan for: a name (``'tpu:v5e:2x4'``,
      ``'h100:8'``, ``'a100-40gb'``, ``'l4'``; see :func:`load_target`) or a
      :class:`Target`; ``None`` for the device at hand.
    mesh_axes: the mesh axes the batch is split over, e.g. ``('data',)``;
      without ``mesh`` a 1-D mesh of that name is made over all the
      target's devices (Explicit axes). Needed for a target of several
      devices unless ``mesh`` is given (then all its axes by default).
    mesh: a ``jax.sharding.Mesh`` over ``target.devices``, for several batch
      axes, 2-D layouts or Auto axes.
    in_specs: one entry per positional argument: ``None`` (the batch split
      over ``mesh_axes`` along its leading axis, anything else replicated),
      a ``PartitionSpec`` for all its leaves, a pytree prefix of them, or a
      callable from a leaf's ``ShapeDtypeStruct`` to its ``PartitionSpec``
      (the usual FSDP rule). Keyword arguments are replicated.
    headroom: the share of each device's memory to keep free (see
      :func:`load_target`); ignored when ``budget_bytes`` is given.
    search: ``'bisect'`` (about ``log2(n) + 1`` of ``n`` candidate ``k``
      compiled) or ``'all'`` (every one: the smallest ``k`` that fits, for
      sure).
    **kwargs: example keyword arguments of the step.

  Returns:
    A :class:`MemoryPlan`; ``print(plan)`` prints its table.

  Raises:
    PlanDoesNotFit: (a ``ValueError``) even the largest ``k`` does not fit;
      the message has the table, the error its candidates.
    ValueError: if no budget is given and the device reports none, if a
      ``k`` does not divide the batch size (or splits a micro-batch unevenly
      over the batch axes), or a layout that does not fit the target.
    RuntimeError: the target's compiler is not installed (the message names
      the pip extra).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import accum_jax
    >>> def loss_fn(w, batch):
    ...   return jnp.mean(jnp.tanh(batch @ w) ** 2)
    >>> def make_step(k, remat):
    ...   tx = accum_jax.accumulate(optax.sgd(0.1), k)
    ...   grad_step = accum_jax.value_and_update(loss_fn, tx, remat=remat)
    ...   def step(w, opt_state, batch):
    ...     loss, updates, opt_state = grad_step(w, opt_state, batch)
    ...     return optax.apply_updates(w, updates), opt_state, loss
    ...   return step
    >>> w = jnp.zeros((64, 64))
    >>> opt_state = accum_jax.accumulate(optax.sgd(0.1), 1).init(w)
    >>> batch = jax.ShapeDtypeStruct((512, 64), jnp.float32)
    >>> plan = accum_jax.plan_microbatches(
    ...     make_step, w, opt_state, batch, batch_argnum=2,
    ...     donate_argnums=(0, 1), budget_bytes=400_000, remat=(None,),
    ...     print_fn=None)
    >>> plan.num_microbatches, plan.peak_bytes <= 400_000
    (2, True)
    >>> plan.skipped  # not compiled (4 of the 10 divisors of 512 were)
    (8, 16, 64, 128, 256, 512)
  """
  if not 0 <= batch_argnum < len(args):
    raise ValueError(
        f'batch_argnum={batch_argnum} is out of range for {len(args)} '
        'positional arguments.'
    )
  size = _leading_size(args[batch_argnum], batch_argnum)
  described, shards = None, 1
  if target is not None:
    target = _targets.load_target(target, headroom=headroom)
    placement = _placement.place(target, args, kwargs,
                                 batch_argnum=batch_argnum,
                                 mesh_axes=mesh_axes, mesh=mesh,
                                 in_specs=in_specs)
    args, kwargs, shards = placement.args, placement.kwargs, \
        placement.batch_shards
    described = target.describe(budget_bytes) + '; peaks per device'
    if budget_bytes is None:
      budget_bytes = target.budget_bytes
      if budget_bytes is None:
        raise ValueError(f'The memory of target {target.name!r} is not '
                         'known; pass budget_bytes= explicitly.')
  elif mesh_axes is not None or mesh is not None or in_specs is not None:
    raise ValueError('mesh_axes=, mesh= and in_specs= lay the step out on '
                     "a target's devices: pass target= too (e.g. "
                     "target='tpu:v5e:2x4', or 'cpu:8' for this machine).")
  if budget_bytes is None:
    budget_bytes = device_memory_budget()
    if budget_bytes is None:
      raise ValueError(
          f'The {jax.default_backend()} backend reports no memory capacity; '
          'pass budget_bytes= explicitly (or target=).'
      )
  if num_microbatches is None:
    ks = [k for k in range(1, size + 1)
          if size % k == 0 and (size // k) % shards == 0]
    if not ks:
      raise ValueError(f'The batch of {size} cannot be split over the '
                       f'{shards} batch shards of the mesh.')
  else:
    ks = sorted({_checks.check_num_microbatches(k) for k in num_microbatches})
    if not ks:
      raise ValueError(
          'num_microbatches is empty; give the k to try (e.g. [1, 2, 4, 8]) '
          'or None for every divisor of the batch size.'
      )
    bad = [k for k in ks if size % k]
    if bad:
      raise ValueError(
          f'num_microbatches {bad} do not divide the batch size {size}.'
      )
    uneven = [k for k in ks if (size // k) % shards]
    if uneven:
      raise ValueError(
          f'num_microbatches {uneven} give micro-batches of '
          f'{[size // k for k in uneven]} rows, which do not split over the '
          f'{shards} batch shards of the mesh.')
  remat = tuple(remat)
  if not remat:
    raise ValueError('remat must name at least one option, e.g. (None,).')
  if unroll is None:
    unrolls = (None,)
  else:
    unrolls = tuple(_options.check_unroll(u) for u in unroll)
    if not unrolls:
      raise ValueError('unroll must name at least one option, e.g. (1, '
                       'True), or be None.')

  context = (placement.context if target is not None
             else contextlib.nullcontext)

  def compile_k(k):
    tried = []
    for option in remat:
      for u in unrolls:
        step = make_step(k, option) if u is None else make_step(k, option, u)
        with context():
          try:
            memory = compiled_memory(step, *args,
                                     donate_argnums=donate_argnums, **kwargs)
          except jax.errors.JaxRuntimeError as e:
            needs = _refused(e)
            if needs is None:
              raise
            # XLA:TPU refuses a program over the device's memory: it fits
            # nowhere, and needs at least what the compiler says.
            tried.append(PlanCandidate(k, option, needs, math.nan, False,
                                       None, u))
            continue
        tried.append(PlanCandidate(k, option, memory.peak_bytes, memory.flops,
                                   memory.peak_bytes <= budget_bytes, memory,
                                   u))
    return tried

  if search not in ('bisect', 'all'):
    raise ValueError(f"search must be 'bisect' or 'all', got {search!r}.")
  # Bisection for the first k that fits: ks[lo - 1] is known not to fit
  # (or lo == 0), ks[hi] is known to fit (or hi == len(ks)).
  compiled, lo, hi = {}, 0, len(ks)
  if search == 'all':
    compiled = {k: compile_k(k) for k in ks}
    hi = next((i for i, k in enumerate(ks) if _choose(compiled[k])), len(ks))
    lo = hi
  while lo < hi:
    mid = (lo + hi) // 2
    compiled[ks[mid]] = compile_k(ks[mid])
    if _choose(compiled[ks[mid]]) is None:
      lo = mid + 1
    else:
      hi = mid
  candidates = tuple(c for k in sorted(compiled) for c in compiled[k])
  skipped = tuple(k for k in ks if k not in compiled)
  if hi == len(ks):
    where = f' per device on {target.name}' if target is not None else ''
    raise PlanDoesNotFit(
        f'No plan fits the budget of {budget_bytes} bytes '
        f'({_mib(budget_bytes)}){where}: even k={ks[-1]} with remat '
        f'options {[remat_name(r) for r in remat]} needs '
        f'{_mib(min(c.peak_bytes for c in compiled[ks[-1]]))}. Tried:\n'
        + _table(candidates, budget_bytes, skipped=skipped, target=described),
        candidates, int(budget_bytes), described)
  chosen = _choose(compiled[ks[hi]])
  plan = MemoryPlan(chosen.num_microbatches, chosen.remat, chosen.peak_bytes,
                    chosen.flops, int(budget_bytes), candidates, chosen.unroll,
                    skipped, described)
  if print_fn is not None:
    print_fn(plan.table())
  return plan
