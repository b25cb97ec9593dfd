"""Accumulation on an 8-device CPU mesh: numbers equal one device, and the
gradient is reduced across devices once per step, outside the micro-batch loop.

The mesh checks run in subprocesses (``tests/sharding_worker.py``, one per
configuration, all started together) because the device count must be set
before jax starts. Each compiled step's HLO is parsed and its collectives
counted inside and outside the ``while`` loop, restricted to those that
communicate along the data axis.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accum_jax
from benchmarks import hlo as _hlo

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

HERE = pathlib.Path(__file__).parent
CONFIGS = ('dp', 'fsdp', '2d', 'auto')
KS = (1, 2, 4, 8)
# Generous: three 8-device workers compile in parallel on a 2-core machine.
TIMEOUT_S = int(os.environ.get('ACCUM_JAX_SHARDING_TIMEOUT', 1200))
NONE = {'all-reduce': 0, 'reduce-scatter': 0, 'all-gather': 0,
        'all-to-all': 0, 'collective-permute': 0}


@pytest.fixture(scope='module')
def results():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
  env.pop('XLA_FLAGS', None)
  procs = {}
  try:
    for config in CONFIGS:
      procs[config] = subprocess.Popen(
          [sys.executable, str(HERE / 'sharding_worker.py'), config],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for config, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
      assert proc.returncode == 0, stderr[-4000:]
      out[config] = json.loads(stdout)
    return out
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
      proc.communicate()  # reap it and close its pipes


def _close(record, name):
  assert len(record['got']) == len(record['want']), name
  for i, (got, want) in enumerate(zip(record['got'], record['want'],
                                      strict=True)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-6, err_msg=f'{name} leaf {i}')


def _data(record, where):
  return record['counts']['data'][where]


# What a step reduces over the data axis: the worker's 3 gradient leaves, the
# loss and the weight sum.
ARRAYS = 3 + 2


def _once(results, config, arrays=ARRAYS):
  """The all-reduce ops of reducing ``arrays`` arrays once: one where XLA
  combines them (the worker's probe; XLA:CPU of jaxlib 0.10.2 does), else one
  per array (jaxlib 0.7.0)."""
  return 1 if results[config]['xla']['combines_all_reduces'] else arrays


@pytest.mark.parametrize('config', CONFIGS)
def test_numbers_equal_one_device(results, config):
  checked = [n for n in results[config] if n not in ('errors', 'xla')]
  assert len(checked) >= 16
  for name in checked:
    _close(results[config][name], name)


@pytest.mark.parametrize('k', KS)
@pytest.mark.parametrize('api', ('grad', 'update'))
def test_data_parallel_reduces_once_outside_the_loop(results, api, k):
  record = results['dp'][f'dp/{api}/k{k}']
  # One (combined) all-reduce per step, nothing in the loop, and no other
  # collective anywhere: the batch is never resharded.
  assert record['counts']['all']['inside'] == NONE
  assert record['counts']['all']['outside'] == {
      **NONE, 'all-reduce': _once(results, 'dp')}
  # Replicated parameters stay replicated.
  assert set(record['param_specs']) <= {'P()', 'P(None, None)', 'P(None,)'}


@pytest.mark.parametrize('k', KS)
@pytest.mark.parametrize('api', ('grad', 'update'))
def test_auto_axes_named_reduce_once_outside_the_loop(results, api, k):
  # Mesh(devices, ('data',)) has Auto axes; with axis_name='data' the loop
  # is split as on an explicit mesh: nothing in the loop, one all-reduce.
  counts = results['auto'][f'auto/{api}/k{k}']['counts']['all']
  assert counts['inside'] == NONE
  assert counts['outside'] == {**NONE, 'all-reduce': _once(results, 'auto')}


@pytest.mark.parametrize('k', KS)
def test_auto_axes_unnamed_warns_with_the_fix(results, k):
  record = results['auto'][f'auto/unnamed_update/k{k}']
  (warning,) = record['warnings']
  assert warning.startswith("accum_jax: the mesh has Auto axes ('data': 8)")
  assert "pass axis_name='data' for one reduction per step" in warning
  assert 'pass axis_name=() to silence' in warning
  # The fallback: the partitioner's all-reduce in every micro-batch.
  if k > 1:
    assert _data(record, 'inside')['all-reduce'] >= 1
  silenced = results['auto'][f'auto/silenced_update/k{k}']
  assert silenced['warnings'] == []
  assert silenced['counts'] == record['counts']


def test_auto_axes_hidden_params_warn_with_the_fix(results):
  record = results['auto']['auto/params_hidden']
  (warning,) = record['warnings']
  assert warning.startswith("accum_jax: the batch axes ('data',) are Auto")
  assert 'gathered whole on every device' in warning
  assert 'param_specs=' in warning and 'axis_name=()' in warning
  declared = results['auto']['auto/params_declared']
  assert declared['warnings'] == []
  assert declared['counts'] == record['counts']


@pytest.mark.parametrize('k', (1, 4))
@pytest.mark.parametrize('api', ('grad', 'update'))
def test_auto_axes_fsdp_stays_sharded(results, api, k):
  """FSDP on Auto axes with param_specs: as on Explicit axes, the gradients
  reduce-scattered per micro-batch, the accumulator and the params sharded
  (the numbers: test_numbers_equal_one_device)."""
  record = results['auto'][f'auto_fsdp/{api}/k{k}']
  inside, outside = _data(record, 'inside'), _data(record, 'outside')
  loop = inside if k > 1 else outside  # XLA drops a one-trip loop
  # One reduce-scatter per sharded leaf per micro-batch (where XLA:CPU
  # gathers the loop-invariant params is its own choice; the GPU and TPU
  # compilers gather per micro-batch, tests/test_aot.py).
  assert loop['reduce-scatter'] == 3
  if k > 1:
    assert outside['reduce-scatter'] == 0
  # Under Auto axes jax drops a spec's trailing Nones: P('data', None) is
  # P('data',).
  want = ["P('data',)", "P('data',)", "P(None, 'data')"]
  assert record.get('grad_specs', record.get('acc_specs')) == want
  assert record['param_specs'] == want


def test_auto_axes_outside_jit_read_the_arrays_sharding(results):
  record = results['auto']['auto/eager']
  assert record['axes'] == ['data']
  assert record['warnings'] == []


@pytest.mark.parametrize('name', ('auto/named', 'dp/in_shard_map',
                                  'dp/linen'))
def test_named_axis_reduces_once(results, name):
  counts = results['dp'][name]['counts']['all']
  assert counts['inside'] == NONE
  arrays = 2 + 2 if name == 'dp/linen' else ARRAYS  # nn.Dense: 2 leaves
  assert counts['outside'] == {**NONE,
                               'all-reduce': _once(results, 'dp', arrays)}


@pytest.mark.parametrize('name', ('dp/naive', 'auto/unnamed'))
def test_plain_scan_reduces_inside_the_loop(results, name):
  # The baseline the mechanism exists for (and a check that the HLO counter
  # sees in-loop reductions): a plain scan all-reduces every micro-batch.
  assert _data(results['dp'][name], 'inside')['all-reduce'] >= 1


@pytest.mark.parametrize('k', KS)
@pytest.mark.parametrize('api', ('grad', 'update'))
def test_fsdp_per_microbatch(results, api, k):
  record = results['fsdp'][f'fsdp_per_microbatch/{api}/k{k}']
  inside, outside = _data(record, 'inside'), _data(record, 'outside')
  loop = inside if k > 1 else outside  # XLA drops a one-trip loop
  # One reduce-scatter per sharded leaf per micro-batch, none outside.
  assert loop['reduce-scatter'] == 3
  assert inside['all-reduce'] == inside['all-to-all'] == 0
  assert outside['all-reduce'] <= _once(results, 'fsdp', 2)  # loss, weight
  want = ["P('data',)", "P('data', None)", "P(None, 'data')"]
  assert record.get('grad_specs', record.get('acc_specs')) == want
  if api == 'update':
    assert record['param_specs'] == want


@pytest.mark.parametrize('name, gathers, specs', [
    ('mlp', {'bf16': 2, 'f32': 1},
     ["P('data',)", "P('data', None)", "P(None, 'data')"]),
    ('linen', {'bf16': 4},
     ["P('data',)", "P(None, 'data')", "P('data',)", "P('data', None)"]),
])
def test_fsdp_gathers_a_cast_parameter_cast(results, name, gathers, specs):
  """A loss computing in bfloat16 (by hand, and a Flax linen model with
  ``dtype=bfloat16``): the parameters it only casts are gathered in
  bfloat16, as GSPMD gathers a hand-written loop's (half the bytes); the
  hand-written loss's b1, also read in float32, in float32. The gradients
  are reduce-scattered in float32 and bit-identical to gathering float32."""
  record = results['fsdp'][f'fsdp_cast/{name}/k4']
  assert record['gathers'] == gathers, record['gathers']
  assert record['f32_gathers'] == {'f32': sum(gathers.values())}, record
  assert record['scatters'] == {'f32': sum(gathers.values())}, record
  assert record['got'] == record['want']  # gathered f32, then cast
  assert record['grad_specs'] == specs
  for got, want in zip(record['got'], record['full_batch'], strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2,
                               atol=2e-3)


@pytest.mark.parametrize('k', KS)
@pytest.mark.parametrize('api', ('grad', 'update'))
def test_fsdp_per_step(results, api, k):
  record = results['fsdp'][f'fsdp_per_step/{api}/k{k}']
  assert _data(record, 'inside') == NONE
  outside = _data(record, 'outside')
  assert outside['reduce-scatter'] == 3
  assert outside['all-reduce'] == _once(results, 'fsdp', 2)  # loss, weight
  assert outside['all-gather'] == 3  # the params, once per step
  want = ["P('data',)", "P('data', None)", "P(None, 'data')"]
  assert record.get('grad_specs', record.get('acc_specs')) == want


def test_fsdp_cross_step_keeps_shardings(results):
  """k cross-step tx.update calls on FSDP-sharded params (explicit axes):
  the full-batch step (test_numbers_equal_one_device), and the params and
  the accumulator keep their shardings."""
  record = results['fsdp']['fsdp/cross_step']
  want = ["P('data',)", "P('data', None)", "P(None, 'data')"]
  assert record['param_specs'] == want
  assert record['acc_specs'] == want


@pytest.mark.parametrize('k', KS)
@pytest.mark.parametrize('api', ('grad', 'update'))
def test_2d_mesh_reduces_data_axis_once(results, api, k):
  record = results['2d'][f'tp/{api}/k{k}']
  assert _data(record, 'inside') == NONE
  assert _data(record, 'outside') == {**NONE,
                                      'all-reduce': _once(results, '2d')}
  assert record.get('grad_specs', record.get('acc_specs')) == [
      "P('model',)", "P(None, 'model')", "P('model',)"]


def test_2d_fsdp_keeps_shardings(results):
  record = results['2d']['tp_fsdp/update/k8']
  assert record['param_specs'] == record['want_specs']
  assert record['acc_specs'] == record['want_specs']
  inside = _data(record, 'inside')
  assert inside['all-reduce'] == inside['all-to-all'] == 0


def _spec(text):
  """'P(None, 'data', None)' -> ('None', "'data'"): trailing Nones dropped."""
  entries = [e.strip() for e in text[2:-1].split(',')]
  while entries and entries[-1] in ('None', ''):
    entries.pop()
  return tuple(entries)


@pytest.mark.parametrize('name', ('dp/token_update',
                                  'fsdp_per_microbatch/token_update',
                                  'fsdp_per_step/token_update'))
def test_weighted_update_keeps_param_sharding(results, name):
  record = results[name.split('/')[0].split('_per')[0]][name]
  assert ([_spec(s) for s in record['update_specs']]
          == [_spec(s) for s in record['param_specs']])


def test_mesh_errors(results):
  errors = results['dp']['errors']
  assert errors['indivisible'].startswith('ValueError: The batch size 64 is '
                                          'split over 8 devices')
  assert 'multiple of 8 * 16 = 128' in errors['indivisible']
  assert errors['bad_axis'].startswith(
      "ValueError: axis_name='batch' names axes ['batch']")
  assert errors['bad_fsdp'].startswith('ValueError: fsdp_reduce must be one')
  assert errors['mixed_axes'].startswith(
      'ValueError: The batch leaves are sharded over different mesh axes '
      "along the batch dimension (['mask']: ('a',), ['y']: ('b',))")
  assert errors['fsdp_skip'].startswith(
      "ValueError: nonfinite='skip_step' with parameters sharded over the "
      "batch axes ('data',) needs fsdp_reduce='per_step'")


def _loss(w, batch):
  return jnp.mean((batch['x'] @ w) ** 2)


def test_axis_name_needs_a_mesh():
  batch = {'x': jnp.ones((8, 2))}
  with pytest.raises(ValueError, match=r"axis_name='data' was given but "
                     r'there is no mesh'):
    accum_jax.value_and_grad(_loss, 2, axis_name='data')(jnp.ones(2), batch)


def test_bad_fsdp_reduce():
  with pytest.raises(ValueError, match=r"fsdp_reduce must be one of "
                     r"\('per_microbatch', 'per_step'\), got 'never'"):
    accum_jax.value_and_grad(_loss, 2, fsdp_reduce='never')(
        jnp.ones(2), {'x': jnp.ones((8, 2))})


def test_batch_not_divisible_by_devices_times_k():
  mesh = jax.sharding.AbstractMesh((4,), ('data',))
  f = accum_jax.value_and_grad(_loss, 4, mesh=mesh, axis_name='data')
  with pytest.raises(ValueError, match=r'The batch size 8 is split over 4 '
                     r"devices \(mesh axes \('data',\)\) and "
                     r'num_microbatches=4: it must be a multiple of 4 \* 4'):
    jax.eval_shape(f, jnp.ones(2), {'x': jnp.ones((8, 2))})


HLO = """\
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %rs = f32[2]{0} reduce-scatter(f32[4]{0} %x), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}, to_apply=%add
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond, body=%body
  %ag = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %y), channel_id=3, replica_groups={}, dimensions={0}, metadata={op_name="all-reduce(x)"}
  %agd = f32[8]{0} all-gather-done(%ag)
}
"""


def test_hlo_counter():
  counts = _hlo.count_collectives(HLO)
  assert counts['inside'] == {**NONE, 'all-reduce': 1, 'reduce-scatter': 1}
  assert counts['outside'] == {**NONE, 'all-gather': 1}

  class Device:
    def __init__(self, i):
      self.id = i

  class Mesh:  # devices 0..3 on a (data=2, model=2) grid
    axis_names = ('data', 'model')
    devices = np.array([[Device(0), Device(1)], [Device(2), Device(3)]])

  # {0,1},{2,3} vary along model; [2,2]<=[2,2]T(1,0) is {0,2},{1,3}: data.
  data = _hlo.count_collectives(HLO, Mesh, 'data')
  assert data['inside'] == {**NONE, 'reduce-scatter': 1}
  assert data['outside'] == {**NONE, 'all-gather': 1}
  model = _hlo.count_collectives(HLO, Mesh, 'model')
  assert model['inside'] == {**NONE, 'all-reduce': 1}
