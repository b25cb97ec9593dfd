"""The examples run, end to end, with small sizes, and show what they claim."""

import importlib.util
import os
import pathlib

import jax
import numpy as np
import pytest

import accum_jax

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / 'examples'


def load_example(name):
  spec = importlib.util.spec_from_file_location(
      f'accum_jax_example_{name}', EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_digits_matches_full_batch_at_lower_memory(tmp_path, capsys):
  pytest.importorskip('sklearn')
  out = tmp_path / 'digits.png'
  results = load_example('digits').main(
      ['--k', '4', '--batch-size', '128', '--epochs', '2', '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'max difference over training' in printed
  assert 'peak step memory, accumulate k=4' in printed
  full, accum = (results['history'][n] for n in ('full batch',
                                                 'accumulate k=4'))
  assert len(full['step_loss']) == 2 * (1437 // 128)
  np.testing.assert_allclose(accum['step_loss'], full['step_loss'], rtol=1e-5)
  assert results['loss_diff'] < 1e-5 and results['param_diff'] < 1e-5
  assert results['acc_diff'] == 0.0
  # Micro-batches of 32 rows need less step memory than the batch of 128.
  assert results['memory']['accumulate k=4'] < results['memory']['full batch']
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_digits_rejects_a_batch_not_divisible_by_k(tmp_path):
  pytest.importorskip('sklearn')
  with pytest.raises(SystemExit, match='must be a multiple of --k 8'):
    load_example('digits').main(['--batch-size', '100', '--out',
                                 str(tmp_path / 'x.png')])


def test_lm_token_weighting_shows_the_trap(capsys):
  results = load_example('lm_token_weighting').main(['--steps', '3'])
  printed = capsys.readouterr().out
  assert 'token-weighted (weight_fn)' in printed
  # Weighted by real tokens: the full-batch numbers; mean of means: not.
  assert results['weighted_loss_diff'] < 1e-5 * results['full_loss']
  assert results['weighted_grad_diff'] < 1e-6
  assert results['unweighted_loss_diff'] > 1e-4
  assert results['unweighted_grad_diff'] > 1e-4
  assert results['train_weighted_param_diff'] < 1e-5
  assert results['train_unweighted_param_diff'] > 1e-3


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  nb = nbformat.read(EXAMPLES / 'colab_tpu.ipynb', as_version=4)
  # The kernel is a fresh process started with this environment: small
  # sizes, 4 CPU devices for the mesh, and this checkout's accum_jax (the
  # notebook skips its pip install when accum_jax is importable).
  monkeypatch.setenv('ACCUM_JAX_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  monkeypatch.delenv('ACCUM_JAX_SOURCE', raising=False)
  nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}}).execute()
  text = '\n'.join(out.get('text', '') for cell in nb.cells
                   if cell.cell_type == 'code' for out in cell.outputs)
  # The kernel imports the accum_jax under test: this checkout's, or the
  # installed wheel's when the suite runs against it (.ci/wheel).
  assert f'from {pathlib.Path(accum_jax.__file__).parent}' in text
  assert "Mesh('data': 4" in text
  assert 'max |params difference| after one step' in text
  assert 'examples/s' in text


TINY_LM = ['--target', 'cpu', '--layout', 'one', '--layers', '2', '--dim',
           '64', '--heads', '4', '--vocab', '256', '--seq', '32', '--batch',
           '16']


def test_plan_for_target_picks_the_smallest_k_that_fits(capsys):
  example = load_example('plan_for_target')
  plan = example.main(TINY_LM + ['--budget-mib', '4', '--search', 'all'])
  printed = capsys.readouterr().out
  assert plan.peak_bytes <= 4 * 2**20 and 'Fits on cpu (one) at k=' in printed
  assert plan.target.startswith('cpu: 1 x cpu')
  for c in plan.candidates:  # every k compiled: none smaller fits
    if c.num_microbatches < plan.num_microbatches:
      assert c.peak_bytes > 4 * 2**20
  # The peak is the step's own, compiled outside the planner.
  example_args = (example.lm_params(2, 64, 256, 32),)
  step = example.make_step_factory(4)(plan.num_microbatches, plan.remat)
  opt_state = jax.eval_shape(
      accum_jax.accumulate(example.optimizer(), 1, cross_step=False).init,
      *example_args)
  tokens = jax.ShapeDtypeStruct((16, 32), np.int32)
  memory = accum_jax.compiled_memory(
      step, *example_args, opt_state, {'inputs': tokens, 'targets': tokens},
      donate_argnums=(0, 1))
  assert memory.peak_bytes == plan.peak_bytes


def test_plan_for_target_says_when_nothing_fits(capsys):
  plan = load_example('plan_for_target').main(TINY_LM + ['--budget-mib', '1'])
  assert plan is None
  assert 'Does not fit on cpu (one) at any k: the smallest is k=16' in \
      capsys.readouterr().out
