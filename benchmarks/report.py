"""Markdown tables, target checks and PNG plots from a benchmark result."""

import math
import os
import statistics
from typing import Any

MiB = 2**20
TARGETS = {'time': 1.03, 'memory': 1.02, 'memory_vs_multisteps': 0.80}


def _groups(rows):
  out: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in rows:
    out.setdefault((r['model'], r['dtype']), []).append(r)
  return out


def _contenders(rows):
  seen = []
  for r in rows:
    if r['contender'] not in seen:
      seen.append(r['contender'])
  return seen


def _pivot(rows, fmt):
  ks = sorted({r['k'] for r in rows})
  names = {r['contender']: r['contender_name'] for r in rows}
  lines = ['| contender | ' + ' | '.join(f'k={k}' for k in ks) + ' |',
           '|---|' + '---:|' * len(ks)]
  for key in _contenders(rows):
    cells = []
    for k in ks:
      r = next((r for r in rows if r['contender'] == key and r['k'] == k),
               None)
      cells.append('' if r is None else fmt(r))
    lines.append(f'| {names[key]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _ratio(x):
  return '' if x is None else f' ({x:.2f}x)'


def target_rows(result):
  """Per model and dtype: accum_jax's ratios over k >= 2, and at k = 1."""
  out = []
  for (model, dtype), rows in _groups(result['rows']).items():
    acc = [r for r in rows if r['contender'] == 'accum'
           and r['memory_vs_scan'] is not None]
    multi = [r for r in acc if r['k'] > 1]
    if not multi:
      continue
    ms = {r['k']: r['peak_bytes'] for r in rows
          if r['contender'] == 'multisteps'}
    vs_ms = [r['peak_bytes'] / ms[r['k']] for r in multi if r['k'] in ms]
    one = next((r for r in acc if r['k'] == 1), None)
    out.append({
        'model': model, 'dtype': dtype,
        'time_vs_scan_median': statistics.median(
            r['time_vs_scan'] or math.nan for r in multi),
        'time_vs_scan_max': max(r['time_vs_scan'] or math.nan for r in multi),
        'memory_vs_scan_max': max(r['memory_vs_scan'] for r in multi),
        'memory_vs_scan_k1': one['memory_vs_scan'] if one else None,
        'memory_vs_multisteps_max': max(vs_ms) if vs_ms else None,
    })
  return out


def targets(result) -> str:
  def fmt(x, d=3):
    return '' if x is None else f'{x:.{d}f}'

  lines = ['| model | dtype | time / scan, k >= 2: median (max) | '
           'memory / scan, k >= 2: max | memory / scan, k = 1 | '
           'memory / MultiSteps, k >= 2: max |',
           '|---|---|---:|---:|---:|---:|']
  for t in target_rows(result):
    lines.append(
        f'| {t["model"]} | {t["dtype"]} | {fmt(t["time_vs_scan_median"])} '
        f'({fmt(t["time_vs_scan_max"])}) | {fmt(t["memory_vs_scan_max"], 4)} '
        f'| {fmt(t["memory_vs_scan_k1"], 4)} | '
        f'{fmt(t["memory_vs_multisteps_max"], 4)} |')
  return '\n'.join(lines)


def markdown(result) -> str:
  env, cfg = result['environment'], result['config']
  out = [
      '# accum_jax benchmark results',
      '',
      f'Taken on **{env["backend"]} ({env["device_kind"]})**, '
      f'{env["cpu_count"]} CPU cores, {env["date_utc"]} UTC; jax '
      f'{env["jax"]}, jaxlib {env["jaxlib"]}, optax {env["optax"]}, flax '
      f'{env["flax"]}, accum_jax {env["accum_jax"]}. Sizes `{cfg["size"]}`, '
      f'{cfg["reps"]} timed optimizer steps per cell after {cfg["warmup"]} '
      f'warm-up, adam. Whole run: {env["wall_s"]:.0f} s.',
      '',
      'Step time: median over interleaved optimizer steps (a cross-step '
      'contender makes k jitted calls per step), with the ratio to the '
      'hand-written scan. Peak memory: compiled `memory_analysis()` argument + '
      'output + temporaries - aliased, params and optimizer state donated '
      '(a cross-step contender: one micro-step call). Every contender applies '
      'the update inside its jitted step.',
      '',
      '## accum_jax value_and_update against the targets',
      '',
      targets(result),
      '',
      f'Targets: time <= {TARGETS["time"]}x and memory <= '
      f'{TARGETS["memory"]}x the hand-written scan; memory <= '
      f'{TARGETS["memory_vs_multisteps"]}x optax.MultiSteps on the MLP.',
  ]
  for (model, dtype), rows in _groups(result['rows']).items():
    params = rows[0]['param_bytes'] / MiB
    out += [
        '', f'## {model}, {dtype} (batch {rows[0]["batch_size"]}, params '
        f'{params:.2f} MiB)', '',
        'Step time, ms (ratio to the hand-written scan); spread p25-p75 in '
        'the JSON:', '',
        _pivot(rows, lambda r: f'{r["median_s"] * 1e3:.2f}'
               + _ratio(r['time_vs_scan'])), '',
        'Compiled peak memory, MiB (ratio to the hand-written scan):', '',
        _pivot(rows, lambda r: f'{r["peak_bytes"] / MiB:.2f}'
               + _ratio(r['memory_vs_scan'])), '',
        'Temporaries (activations, loop carries), MiB:', '',
        _pivot(rows, lambda r: f'{r["temp_bytes"] / MiB:.2f}'), '',
        'Compile time, s:', '',
        _pivot(rows, lambda r: f'{r["compile_s"]:.2f}'),
    ]
    if any(r['allocator_peak_bytes'] for r in rows):
      out += ['', 'Allocator peak_bytes_in_use (run alone), MiB:', '',
              _pivot(rows, lambda r: '' if r['allocator_peak_bytes'] is None
                     else f'{r["allocator_peak_bytes"] / MiB:.2f}')]
  plan = result.get('plan')
  if plan:
    out += ['', f'## Planner: {plan["model"]}, budget '
            f'{plan["budget_bytes"] / MiB:.2f} MiB', '',
            f'`accum_jax.plan_microbatches` chose k={plan["num_microbatches"]}, '
            f'remat={plan["remat"]} ({plan["peak_bytes"] / MiB:.2f} MiB):', '',
            '```', plan['table'], '```']
  return '\n'.join(out) + '\n'


def plots(result, out_dir):
  """``memory_vs_k.png`` and ``time_vs_k.png``: one panel per model, dtype."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = _groups(result['rows'])
  models = list(dict.fromkeys(m for m, _ in groups))
  dtypes = list(dict.fromkeys(d for _, d in groups))
  env = result['environment']
  for what, key, scale, label in (
      ('memory', 'peak_bytes', 1 / MiB, 'compiled peak memory (MiB)'),
      ('time', 'median_s', 1e3, 'median step time (ms)')):
    fig, axes = plt.subplots(len(models), len(dtypes), squeeze=False,
                             figsize=(5.5 * len(dtypes), 3.6 * len(models)))
    for i, model in enumerate(models):
      for j, dtype in enumerate(dtypes):
        ax = axes[i][j]
        rows = groups.get((model, dtype), [])
        for name in _contenders(rows):
          pts = sorted((r['k'], r[key] * scale) for r in rows
                       if r['contender'] == name)
          label_name = next(r['contender_name'] for r in rows
                            if r['contender'] == name)
          style = '--' if name == 'full' else '-'
          ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                  marker='o', ms=3, label=label_name)
        ax.set_xscale('log', base=2)
        if what == 'time':
          ax.set_yscale('log')
        ax.set_title(f'{model}, {dtype}', fontsize=10)
        ax.set_xlabel('k (micro-batches)')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=8)
    fig.suptitle(f'{label} vs k, {env["backend"]} ({env["device_kind"]})')
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(os.path.join(out_dir, f'{what}_vs_k.png'), dpi=90)
    plt.close(fig)
