"""A smoke run of the benchmark suite (python -m benchmarks.run)."""

import json
import os

import numpy as np
import optax
import pytest

pytest.importorskip('flax')

from benchmarks import (
  report,  # noqa: E402
  run,  # noqa: E402
)

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

# optax.microbatching is new in optax 0.2.7.
MICROBATCH = ('optax_microbatch',) if hasattr(optax, 'microbatching') else ()


def test_smoke_run_writes_results(tmp_path):
  plots = pytest.importorskip('matplotlib') is not None
  out = str(tmp_path / 'results')
  names = ('full', 'scan', *MICROBATCH, 'multisteps', 'accum')
  argv = ['--quick', '--models', 'mlp', '--ks', '1,2',
          '--contenders', ','.join(names),
          '--reps', '1', '--warmup', '1', '--out', out]
  run.main(argv)
  with open(os.path.join(out, 'results.json')) as f:
    result = json.load(f)
  assert result['environment']['jax'] and result['environment']['optax']
  rows = {(r['k'], r['contender']): r for r in result['rows']}
  assert set(rows) == {(k, c) for k in (1, 2) for c in names}
  for r in rows.values():
    assert r['peak_bytes'] == (r['argument_bytes'] + r['output_bytes']
                               + r['temp_bytes'] - r['alias_bytes'])
    assert r['median_s'] > 0 and r['compile_s'] > 0
  assert rows[2, 'scan']['memory_vs_scan'] == 1.0
  assert rows[2, 'accum']['memory_vs_scan'] <= 1.02
  assert rows[2, 'accum']['peak_bytes'] < rows[2, 'multisteps']['peak_bytes']
  # The in-step contenders train the same model: after the same number of
  # optimizer steps (2) their losses agree with the full-batch one's (the
  # full-batch step is compiled once and keeps training across k: k=1 only).
  for k in (1, 2):
    ref = rows[k, 'full' if k == 1 else 'scan']['final_loss']
    for name in ('scan', *MICROBATCH, 'accum'):
      np.testing.assert_allclose(rows[k, name]['final_loss'], ref, rtol=1e-4)
  assert rows[2, 'full']['final_loss'] < rows[1, 'full']['final_loss']
  with open(os.path.join(out, 'results.md')) as f:
    table = f.read()
  assert '| accum_jax value_and_update |' in table
  assert report.targets(result).count('\n') == 2  # header, rule, one model
  if plots:
    for name in ('memory_vs_k.png', 'time_vs_k.png'):
      assert os.path.getsize(os.path.join(out, name)) > 1000


def test_bad_flags():
  with pytest.raises(SystemExit):
    run.parse_args(['--contenders', 'nope'])
