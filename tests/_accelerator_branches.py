"""A pytest plugin: the formulations accum_jax lowers for GPUs and TPUs, run
on this CPU.

accum_jax picks some formulations per platform with
``lax.platform_dependent`` (the window guard, the cross-step window end, the
noise scale's norm; see docs/architecture.md). XLA:CPU gets the ``cpu`` branch, so the main suite
never runs the others. With ``-p tests._accelerator_branches`` every platform
takes the default (GPU and TPU) branch, and the suite's references check its
numbers (``.ci/run`` does this for the files that drive the transform).
Importing the module changes nothing; loading it as a plugin does, and sets
``ACCUM_JAX_TEST_ACCELERATOR_BRANCHES`` for the worker processes of the mesh
tests, which then call :func:`apply`.
"""


import os

ENV = 'ACCUM_JAX_TEST_ACCELERATOR_BRANCHES'


def pytest_configure(config):
  del config
  os.environ[ENV] = '1'  # the mesh tests' worker processes read it
  apply()


def apply():
  """Every platform takes the GPU/TPU branches (in this process)."""
  from accum_jax import _accumulate, _noise  # pylint: disable=g-import-not-at-top
  _accumulate.COND_PLATFORMS = ()
  _noise.INCREMENT_PLATFORMS = ('cpu', 'cuda', 'rocm')
