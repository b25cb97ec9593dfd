"""Counting cross-device collectives in compiled HLO, inside and outside loops.

Used by the tests and benchmarks to check that the gradient reduction is not
in the micro-batch loop. ``compiled`` is ``jax.jit(f).lower(...).compile()``.
"""

import collections
import re
from typing import Any

import numpy as np

COLLECTIVES = ('all-reduce', 'reduce-scatter', 'all-gather', 'all-to-all',
               'collective-permute')

# A computation's first line; before optimization it may give no signature.
_HEADER = re.compile(
    r'^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{\s*$')
_CALLS = re.compile(
    r'\b(?:calls|to_apply|body|condition|branch_computations|'
    r'called_computations|async_computation)=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)')
_BODY = re.compile(r'\bwhile\(.*?\bbody=%?([\w.\-]+)')
_COND = re.compile(r'\bwhile\(.*?\bcondition=%?([\w.\-]+)')
_OP = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_LIST_GROUPS = re.compile(r'(?:replica_groups|source_target_pairs)=\{(\{[\d,{}\s]*\})?\}')
_IOTA_GROUPS = re.compile(
    r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?')


def _groups(line: str) -> list[list[int]] | None:
  """The device groups of a collective; ``None`` for all devices."""
  iota = _IOTA_GROUPS.search(line)
  if iota:
    shape, dims, perm = (tuple(int(d) for d in g.split(',')) if g else None
                         for g in iota.groups())
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if perm:
      ids = ids.transpose(perm)
    return ids.reshape(shape).tolist()
  listed = _LIST_GROUPS.search(line)
  if listed and listed.group(1):
    return [[int(i) for i in g.split(',') if i.strip()]
            for g in re.findall(r'\{([\d,\s]*)\}', listed.group(1))]
  return None


def _spans(groups, coords, axes) -> bool:
  """Whether some group holds devices at different positions along ``axes``."""
  if groups is None:
    return any(len({c[a] for c in coords.values()}) > 1 for a in axes)
  return any(len({tuple(coords[i][a] for a in axes) for i in g}) > 1
             for g in groups)


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      name = header.group(2)
      comps[name] = []
      if header.group(1):
        entry = name
    elif line.startswith('}'):
      name = None
    elif name is not None:
      # Drop metadata: op names there quote source, not instructions.
      comps[name].append(line.split(', metadata=')[0])
  return comps, entry


def _callees(lines: list[str]) -> set[str]:
  out = set()
  for line in lines:
    for group in _CALLS.findall(line):
      out.update(n.strip().lstrip('%') for n in group.split(','))
  return out


def _loops(comps, bodies_only=False) -> set[str]:
  """The computations that are a ``while`` loop's body (or condition)."""
  patterns = (_BODY,) if bodies_only else (_BODY, _COND)
  return {name for lines in comps.values() for line in lines
          for pattern in patterns for name in pattern.findall(line)}


def _reachable(comps, roots) -> set[str]:
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo.extend(_callees(comps[name]))
  return seen


def count_collectives(compiled: Any, mesh: Any = None,
                      axes: Any = None) -> dict[str, dict[str, int]]:
  """Counts collective ops ``{'inside': {op: n}, 'outside': {op: n}}``.

  ``inside`` counts the ops in the body or condition of any ``while`` loop
  (and what they call); ``outside`` the rest of the entry computation. An
  asynchronous pair (``-start`` / ``-done``) counts once; a combined
  all-reduce of several arrays counts once.

  Args:
    compiled: a compiled executable (``.as_text()`` is read) or HLO text.
    mesh: with ``axes``, count only the collectives that communicate along
      these mesh axes (e.g. the data axis, not a model axis). Device ids in
      the HLO are matched to ``mesh.devices``.
    axes: a mesh axis name or a tuple of them.
  """
  coords = None
  if mesh is not None and axes is not None:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    positions = [mesh.axis_names.index(a) for a in axes]
    coords = {int(d.id): {a: idx[p] for a, p in zip(axes, positions,
                                                    strict=True)}
              for idx, d in np.ndenumerate(mesh.devices)}
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, entry = _computations(text)
  inside = _reachable(comps, _loops(comps))
  outside = _reachable(comps, [entry]) - inside
  counts = {'inside': collections.Counter(), 'outside': collections.Counter()}
  for where, names in (('inside', inside), ('outside', outside)):
    for name in names:
      for line in comps[name]:
        for op in _OP.findall(line):
          if coords is None or _spans(_groups(line), coords, axes):
            counts[where][op] += 1
  return {where: {op: c[op] for op in COLLECTIVES}
          for where, c in counts.items()}


def combines_all_reduces(mesh, axis):
  """Whether XLA makes one all-reduce of three independent ones (XLA:CPU
  of jaxlib 0.10.2 does; of 0.7.0 does not, leaving one per array).

  Counts of all-reduces outside a loop depend on it. The size of ``axis``
  must divide 8.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from accum_jax import _compat

  xs = [jax.device_put(jnp.ones((8, n)), NamedSharding(mesh, P(axis)))
        for n in (1, 2, 3)]
  with _compat.set_mesh(mesh):
    compiled = jax.jit(lambda *xs: [x.sum(0) for x in xs]).lower(
        *xs).compile()
  outside = count_collectives(compiled)['outside']['all-reduce']
  assert outside in (1, 3), outside
  return outside == 1


_DEF = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+?)(?:\{[\d,]*\})?\s+'
                  r'(\S+?)\(')


def loop_readers(compiled: Any, shape: str) -> list[int]:
  """How many instructions read each matmul result of ``shape`` (e.g.
  ``'f32[4096,4096]'``) made in a ``while`` loop's body: one per matmul
  (a ``kind=kCustom`` fusion or a custom call, as XLA:GPU emits them).

  A gradient added into the loop's carry inside the matmul's epilogue, or
  read by one fusion, has one reader; a gradient kept in a buffer that two
  kernels read has two.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, _ = _computations(text)
  counts = []
  for name in _loops(comps, bodies_only=True):
    lines = comps.get(name, [])
    for line in lines:
      found = _DEF.match(line)
      if not found or found.group(2) != shape:
        continue
      op = found.group(3)
      if not (op == 'custom-call' or (op == 'fusion'
                                      and 'kind=kCustom' in line)):
        continue
      use = re.compile('%' + re.escape(found.group(1)) + r'(?![\w.\-])')
      counts.append(sum(1 for other in lines
                        if other is not line and use.search(other.split(
                            '=', 1)[-1])))
  return counts


_COLLECTIVE_TYPE = re.compile(
    r'=\s*\(*([a-z]+\d*)\[[^=]*?\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')


def collective_dtypes(compiled: Any, op: str,
                      loops_only: bool = False) -> dict[str, int]:
  """``{dtype: n}``: the element types of the ``op`` collectives (e.g.
  ``'all-gather'``), one count per op (an asynchronous pair once, a combined
  op by its first operand's type); with ``loops_only``, those in the body or
  condition of a ``while`` loop only."""
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, entry = _computations(text)
  roots = _loops(comps) if loops_only else [entry]
  counts = collections.Counter()
  for name in _reachable(comps, roots):
    for line in comps[name]:
      found = _COLLECTIVE_TYPE.search(re.sub(r'/\*.*?\*/', '', line))
      if found and found.group(2) == op:
        counts[found.group(1)] += 1
  return dict(counts)
