"""Planning for a named target: accum_jax.load_target, gpu_target and
plan_microbatches(target=, mesh_axes=, in_specs=) on XLA:CPU.

The GPU and TPU compilers' own checks are ``tests/test_aot.py`` (run by
``.ci/aot``); here the targets are this machine's CPU devices, 8 of them in
a subprocess, and the errors a user meets without the accelerator's
compiler installed.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

import accum_jax
from tests import _plan_case

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_cpu_device_plan_is_the_compilers_figure_and_smallest_k():
  peaks = _plan_case.check_plans('cpu', layouts=('one device',))
  assert peaks['one device'][8] < peaks['one device'][1]


def test_eight_cpu_devices_data_parallel_and_fsdp():
  code = textwrap.dedent("""
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      from tests import _plan_case
      peaks = _plan_case.check_plans('cpu:8', layouts=('dp', 'fsdp', '2d'))
      # FSDP holds an eighth of the params and optimizer state per device.
      assert peaks['fsdp'][4] < peaks['dp'][4], peaks
      import accum_jax, pytest
      with pytest.raises(ValueError, match="has 8 devices: name the mesh"):
        _plan_case.plan('cpu:8', _plan_case.example(), 'one device',
                        budget_bytes=2**30)
      with pytest.raises(ValueError, match='do not split over the 8 batch'):
        _plan_case.plan('cpu:8', _plan_case.example(batch=64), 'dp',
                        budget_bytes=2**30, num_microbatches=(16,))
      print('ok', peaks)
  """)
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('ok')


def test_a_plan_prints_its_target_and_table():
  args = _plan_case.example(width=128, batch=256)
  plan = _plan_case.plan('cpu', args, 'one device', remat=(None,),
                         budget_bytes=2**30)
  text = str(plan)
  assert text.splitlines()[0] == ('cpu: 1 x cpu, budget 1.00 GiB (given); '
                                  'peaks per device')
  assert '<- chosen' in text and plan.num_microbatches == 1


def test_a_step_that_cannot_fit_says_so_with_its_smallest():
  args = _plan_case.example(width=128, batch=256)
  with pytest.raises(accum_jax.PlanDoesNotFit, match='bytes .* per device on cpu: even') \
      as e:
    _plan_case.plan('cpu', args, 'one device', remat=(None,),
                    budget_bytes=1000, num_microbatches=(1, 2, 4))
  assert isinstance(e.value, ValueError)
  assert e.value.budget_bytes == 1000
  smallest = e.value.smallest
  assert smallest.peak_bytes == min(c.peak_bytes for c in e.value.candidates)
  assert smallest.peak_bytes == _plan_case.direct_peak(
      accum_jax.load_target('cpu'), _plan_case.make_step(
          smallest.num_microbatches, None), args, 'one device')


def test_the_budget_is_the_memory_less_the_headroom():
  cpu = accum_jax.load_target('cpu')
  gpu = cpu._replace(name='fake', memory_bytes=1000, headroom=0.25)
  assert gpu.budget_bytes == 750
  assert accum_jax.load_target(gpu, headroom=0.5).budget_bytes == 500
  assert cpu.budget_bytes is None
  args = _plan_case.example(width=128, batch=256)
  with pytest.raises(ValueError, match="memory of target 'cpu' is not known"):
    _plan_case.plan('cpu', args, 'one device')
  with pytest.raises(accum_jax.PlanDoesNotFit, match='budget of 500 bytes'):
    _plan_case.plan(gpu, args, 'one device', headroom=0.5, remat=(None,),
                    num_microbatches=(8,))


@pytest.mark.parametrize('name, message', [
    ('gpu', 'Unknown target'),
    ('h100:0', 'positive integer'),
    ('h100:12', '1 to 8, or a multiple of 8'),
    ('cpu:x', 'positive integer'),
    ('cpu:64', 'xla_force_host_platform_device_count=64'),
])
def test_bad_target_names(name, message):
  with pytest.raises((ValueError, RuntimeError), match=message):
    accum_jax.load_target(name)


def test_bad_headroom_and_description():
  with pytest.raises(ValueError, match=r'headroom must be a fraction'):
    accum_jax.load_target('cpu', headroom=1.0)
  with pytest.raises(ValueError, match='device_memory_size'):
    accum_jax.gpu_target('gpu_device_info { core_count: 1 }')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None,
                    reason='libtpu is installed')
def test_a_tpu_target_without_libtpu_names_the_extra():
  with pytest.raises(RuntimeError, match=r'accum_jax\[tpu-plan\]'):
    accum_jax.load_target('tpu:v5e:2x4')


@pytest.mark.skipif(
    importlib.util.find_spec('jax_cuda12_plugin') is not None,
    reason='the CUDA plugin is installed')
@pytest.mark.parametrize('name', ['h100:8', 'a100-40gb', 'a100-80gb', 'l4'])
def test_a_gpu_target_without_the_plugin_names_the_extra(name):
  with pytest.raises(RuntimeError, match=r'accum_jax\[gpu-plan\]'):
    accum_jax.load_target(name)


def test_layout_errors():
  args = _plan_case.example(width=128, batch=256)
  step = _plan_case.make_step
  kw = dict(batch_argnum=2, budget_bytes=2**30, print_fn=None)
  with pytest.raises(ValueError, match='pass target= too'):
    accum_jax.plan_microbatches(step, *args, mesh_axes=('data',), **kw)
  with pytest.raises(ValueError, match='in_specs= needs a mesh'):
    accum_jax.plan_microbatches(step, *args, target='cpu',
                                in_specs=(None, None, P()), **kw)
  cpu = accum_jax.load_target('cpu')
  with pytest.raises(ValueError, match='2 entries for 3'):
    accum_jax.plan_microbatches(step, *args, target=cpu, mesh_axes='data',
                                in_specs=(None, None), **kw)
  with pytest.raises(ValueError, match=r"\['model'\] are not axes"):
    accum_jax.plan_microbatches(step, *args, target=cpu,
                                mesh=jax.make_mesh((1,), ('data',)),
                                mesh_axes=('model',), **kw)
  with pytest.raises(TypeError, match='must return a jax.sharding'):
    accum_jax.plan_microbatches(step, *args, target=cpu, mesh_axes='data',
                                in_specs=(lambda x: None, None, None), **kw)


def test_import_accum_jax_stays_light():
  """No compiler plugin, topology description or HLO text parser is loaded
  by `import accum_jax`; the planner's names load it on first use."""
  code = ('import sys, accum_jax\n'
          'heavy = [m for m in ("accum_jax._planner", "jax.experimental.'
          'topologies", "libtpu", "jax_cuda12_plugin") if m in sys.modules]\n'
          'assert not heavy, heavy\n'
          'accum_jax.plan_microbatches\n'
          'assert "accum_jax._planner" in sys.modules\n'
          'print("ok")')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr
