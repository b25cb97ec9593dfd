"""Counting cross-device collectives in compiled HLO, inside and outside loops.

Used by the tests and benchmarks to check that the gradient reduction is not
in the micro-batch loop. ``compiled`` is ``jax.jit(f).lower(...).compile()``.
"""

import collections
import re
from typing import Any

COLLECTIVES = ('all-reduce', 'reduce-scatter', 'all-gather', 'all-to-all',
               'collective-permute')

_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$')
_CALLS = re.compile(
    r'\b(?:calls|to_apply|body|condition|branch_computations|'
    r'called_computations|async_computation)=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)')
_BODY = re.compile(r'\bwhile\(.*?\bbody=%?([\w.\-]+)')
_COND = re.compile(r'\bwhile\(.*?\bcondition=%?([\w.\-]+)')
_OP = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')


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


def _reachable(comps, roots) -> set[str]:
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo.extend(_callees(comps[name]))
  return seen


def count_collectives(compiled: Any) -> dict[str, dict[str, int]]:
  """Counts collective ops ``{'inside': {op: n}, 'outside': {op: n}}``.

  ``inside`` counts the ops in the body or condition of any ``while`` loop
  (and what they call); ``outside`` the rest of the entry computation. An
  asynchronous pair (``-start`` / ``-done``) counts once; a combined
  all-reduce of several arrays counts once.

  Args:
    compiled: a compiled executable (``.as_text()`` is read) or HLO text.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, entry = _computations(text)
  loops = set()
  for lines in comps.values():
    for line in lines:
      loops.update(_BODY.findall(line))
      loops.update(_COND.findall(line))
  inside = _reachable(comps, loops)
  outside = _reachable(comps, [entry]) - inside
  counts = {'inside': collections.Counter(), 'outside': collections.Counter()}
  for where, names in (('inside', inside), ('outside', outside)):
    for name in names:
      for line in comps[name]:
        for op in _OP.findall(line):
          counts[where][op] += 1
  return {where: {op: c[op] for op in COLLECTIVES}
          for where, c in counts.items()}
