"""Compile-only checks on the compilers users train with: XLA:GPU and XLA:TPU.

Run by ``.ci/aot`` in venvs with ``jax[cuda12]`` / ``jax[tpu]``, with
``AOT_TARGET`` naming the target (``h100:8``, ``tpu:v5e:2x4``; see
``accum_jax._targets``). Without ``AOT_TARGET`` the module is not run (the
main suite's XLA:CPU figures are ``tests/test_memory.py``'s). Nothing is run
on a device: every figure is the target compiler's ``memory_analysis()`` of a
step lowered for its compile-only devices, held against a hand-written twin
compiled the same way (:mod:`benchmarks.aot`).
"""

import os

import pytest

TARGET = os.environ.get('AOT_TARGET', '')
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not TARGET, reason='compile-only: set AOT_TARGET (run by .ci/aot)')]

LIMIT = 1.01

# Rows whose gap is known and open, per compiler (docs/benchmarks.md): each
# is asserted to stay above the limit (strict xfail), so a fix shows up.
OPEN = {
    ('gpu', 'track_noise_scale=True (vs plain twin)'):
        'XLA:GPU adds the gradient into the sum inside the matmul that makes '
        'it; any norm of each micro-batch gradient needs the gradient in a '
        'buffer of its own (one leaf, 64 MiB); at the twin taking each norm',
}


@pytest.fixture(scope='module')
def devices():
  from accum_jax import _targets
  return _targets.devices(TARGET)


@pytest.fixture(scope='module')
def path_rows(devices):
  from benchmarks import aot
  return {r['path']: r for r in aot.path_rows(devices)}


def _row_ids():
  from benchmarks import memory_paths
  return [name for name, *_ in memory_paths.rows(2)]


@pytest.mark.parametrize('path', _row_ids() if TARGET else [])
def test_path_at_the_twin(path, path_rows, devices):
  row = path_rows[path]
  platform = devices[0].platform
  if path == 'k=1 (vs full batch)':
    # The accumulator at rest costs its bytes at k=1: the full batch holds
    # no gradient sum. cross_step=False is the answer (its own row).
    extra = row['accum_jax']['argument'] - row['twin']['argument']
    assert extra == pytest.approx(6 * (4096 * 4096 + 4096) * 4 / 2 ** 20,
                                  rel=1e-3)
    return
  reason = OPEN.get((platform, path))
  if reason is not None:
    assert row['ratio'] > LIMIT, f'{path} now at {row["ratio"]:.3f}: ' \
        'remove it from OPEN'
    pytest.xfail(reason)
  assert row['ratio'] <= LIMIT, row


def test_noise_scale_reads_each_gradient_once(devices):
  """XLA:GPU: with the noise scale tracked, each weight gradient the loop's
  matmuls make is read by one kernel, which adds it into the sum and takes
  its squared norm; a hand-written loop taking the norm reads it twice."""
  if devices[0].platform != 'gpu':
    pytest.skip("XLA:GPU's matmuls")
  from benchmarks import aot
  readers = aot.noise_readers(devices)
  assert readers['accum_jax'] == [1] * 6, readers
  assert readers['twin'] == [2] * 6, readers


def test_lm_one_device_at_the_twin(devices):
  from benchmarks import aot
  (row,) = aot.lm_rows(devices, ['one device'], only=('accum_jax', 'twin'))
  assert row['ratio'] <= LIMIT, row


def test_lm_data_parallel_at_the_twin(devices):
  """On a data-parallel mesh, the default state (its accumulator seeds one
  device's carry) and cross_step=False: the twin's peak, and nothing along
  the data axis inside the loop, the reduction after it."""
  from benchmarks import aot
  (row,) = aot.lm_rows(devices, ['data parallel, Explicit'],
                       only=('accum_jax', 'cross_step=False', 'twin'))
  assert row['ratio'] <= LIMIT, row
  assert row['in_step_ratio'] <= LIMIT, row
  for who in ('accum_jax', 'cross_step=False'):
    ours = row[who]
    assert not ours['inside'], (who, ours)
    assert ours['after'].get('all-reduce', 0) >= 1, (who, ours)


def test_lm_fsdp_gathers_the_cast_parameters(devices):
  """FSDP on the LM, whose loss casts every parameter to bf16 (Explicit
  axes): each all-gather in the loop is bf16, at the twin's peak."""
  from benchmarks import aot
  (row,) = aot.lm_rows(devices, ['FSDP, Explicit'],
                       only=('accum_jax', 'twin'))
  gathered = row['accum_jax']['gathered']
  assert set(gathered) == {'bf16'}, gathered
  assert row['ratio'] <= LIMIT, row


def test_cross_step_call_holds_at_most_the_updates_more(devices):
  """A cross-step tx.update call against optax.MultiSteps': at most one
  parameter-sized buffer more, the updates, which MultiSteps fuses into
  apply_updates because it computes the inner update on every micro-step
  (masked); accum_jax computes it once per window. (A lax.cond there cost
  the whole state again on XLA:GPU: 1.91x.)"""
  from benchmarks import aot
  row = aot.cross_step_row(devices)
  extra = row['accum_jax']['peak'] - row['optax.MultiSteps']['peak']
  assert extra <= 1.01 * row['param_mib'], row


def test_plans_are_the_compilers_figures_and_the_smallest_k():
  """plan_microbatches(target=...) on one device, data parallel and FSDP:
  each candidate's peak is memory_analysis() of the same step compiled
  straight for the target, and the chosen k is the smallest that fits
  (every k compiled to check)."""
  from tests import _plan_case
  one = TARGET.split(':')[0] if TARGET[:3] != 'tpu' else 'tpu:v5e:1x1'
  _plan_case.check_plans(one, layouts=('one device',), ks=(1, 2, 8))
  peaks = _plan_case.check_plans(TARGET, layouts=('dp', 'fsdp'))
  assert all(peaks['fsdp'][k] < peaks['dp'][k] for k in peaks['dp'])


def test_a_step_that_cannot_fit_the_target_says_so():
  """Six 32768-wide layers: 24 GiB of params, with adam and the in-step
  gradient 96 GiB on each device, over any device's budget here."""
  import accum_jax
  from tests import _plan_case
  args = _plan_case.example(width=32768, depth=6, batch=64)
  with pytest.raises(accum_jax.PlanDoesNotFit, match=f'on {TARGET}') as e:
    _plan_case.plan(TARGET, args, 'dp', num_microbatches=(1, 8),
                    remat=(None,))
  target = accum_jax.load_target(TARGET)
  assert e.value.budget_bytes == target.budget_bytes
  assert e.value.smallest.peak_bytes > 96 * 2**30


@pytest.mark.skipif(not TARGET.startswith(('h100', 'a100', 'l4')),
                    reason='GPU descriptions')
@pytest.mark.parametrize('name, gib', [('a100-40gb', 39.42),
                                       ('a100-80gb', 79.26), ('l4', 22.49),
                                       ('h100', 79.10)])
def test_each_gpu_description_compiles_and_has_its_memory(name, gib):
  import accum_jax
  from tests import _plan_case
  target = accum_jax.load_target(name)
  assert target.memory_bytes / 2**30 == pytest.approx(gib, abs=0.01)
  assert target.budget_bytes == int(target.memory_bytes * 0.75)
  assert name.split('-')[0].upper() in target.devices[0].device_kind
  peaks = _plan_case.check_plans(name, layouts=('one device',), ks=(1, 8))
  assert peaks['one device'][8] < peaks['one device'][1]


@pytest.mark.skipif(TARGET[:3] != 'tpu', reason='TPU topologies')
@pytest.mark.parametrize('name, devices, gib', [
    ('tpu:v4:2x2x1', 4, 32.0), ('tpu:v5p:2x2x1', 4, 95e9 / 2**30),
    ('tpu:v6e:2x2', 4, 32.0), ('tpu:v5e:1x1', 1, 16.0),
    ('tpu:v5e:16x16', 256, 16.0)])
def test_each_tpu_generation_loads_with_its_memory(name, devices, gib):
  import accum_jax
  target = accum_jax.load_target(name)
  assert len(target.devices) == devices
  assert target.memory_bytes / 2**30 == pytest.approx(gib)
  assert target.budget_bytes == int(target.memory_bytes * 0.95)
