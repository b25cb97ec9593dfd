"""Two processes on 127.0.0.1 (jax.distributed, 4 CPU devices each) run three
accumulated adam steps on a global batch built from per-process rows; the
parameters must equal a single-process full-batch run."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

HERE = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location(
    'multihost_worker', HERE / 'multihost_worker.py')
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT_S = 100


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _reference():
  """Three full-batch adam steps in this (single-device) process."""
  params = jax.tree.map(np.asarray, worker.make_params())
  opt = optax.adam(worker.LR)
  state = opt.init(params)
  losses = []
  for i in range(worker.STEPS):
    loss, grads = jax.value_and_grad(worker.loss_fn)(params,
                                                     worker.make_batch(i))
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  return params, losses


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  out = tmp_path / 'result.json'
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
  env.pop('XLA_FLAGS', None)
  procs = []
  try:
    for pid in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, str(HERE / 'multihost_worker.py'), str(pid),
           str(port), str(out)],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True))
    logs = []
    for proc in procs:
      try:
        logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
      except subprocess.TimeoutExpired:
        pytest.fail(f'multi-host worker {proc.args[2]} did not finish in '
                    f'{TIMEOUT_S} s')
    for proc, log in zip(procs, logs, strict=True):
      assert proc.returncode == 0, log[-4000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  results = [json.loads(pathlib.Path(f'{out}.{pid}').read_text())
             for pid in range(2)]
  assert [r['devices'] for r in results] == [8, 8]
  assert [r['local_devices'] for r in results] == [4, 4]
  # Each process fed its own half of the rows.
  assert sorted(tuple(r['rows']) for r in results) == [(0, 32), (32, 64)]
  want_params, want_losses = _reference()
  for r in results:
    np.testing.assert_allclose(r['losses'], want_losses, rtol=1e-5)
    for name, want in want_params.items():
      np.testing.assert_allclose(np.asarray(r['params'][name]), want,
                                 rtol=1e-5, atol=1e-6, err_msg=name)
