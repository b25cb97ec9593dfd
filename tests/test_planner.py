"""Tests of accum_jax.compiled_memory and accum_jax.plan_microbatches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import heavy_layers

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

B, WIDTH, DEPTH = 256, 64, 6
NAMES = jax.checkpoint_policies.save_only_these_names('layer')


def loss_fn(params, batch):
  return jnp.mean(heavy_layers(params, batch) ** 2)


def make_step(k, remat):
  tx = accum_jax.accumulate(optax.adam(1e-3), k)
  grad_step = accum_jax.value_and_update(loss_fn, tx, remat=remat)

  def step(params, opt_state, batch):
    loss, updates, opt_state = grad_step(params, opt_state, batch)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def example():
  rng = np.random.default_rng(0)
  params = [jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) / 8, jnp.float32)
            for _ in range(DEPTH)]
  # One example state stands for every k (as in plan_microbatches, which
  # drops the k recorded in an AccumulateState for the same reason).
  opt_state = accum_jax.accumulate(optax.adam(1e-3), 1).init(params)
  batch = jax.ShapeDtypeStruct((B, WIDTH), jnp.float32)
  return params, opt_state, batch


def xla_peak(fn, *args):
  """The figure straight from XLA, independently of compiled_memory."""
  stats = jax.jit(fn, donate_argnums=(0, 1)).lower(
      *args).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def test_compiled_memory_is_xlas_figure():
  args = example()
  m = accum_jax.compiled_memory(make_step(2, None), *args,
                                donate_argnums=(0, 1))
  assert m.peak_bytes == xla_peak(make_step(2, None), *args)
  assert m.peak_bytes == (m.argument_bytes + m.output_bytes + m.temp_bytes
                          - m.alias_bytes)
  assert m.alias_bytes > 0  # params and optimizer state were donated
  assert m.flops > 0 and m.compile_seconds > 0


def test_compiled_memory_of_a_compiled_step():
  args = example()
  compiled = jax.jit(make_step(4, None), donate_argnums=(0, 1)).lower(
      *args).compile()
  m = accum_jax.compiled_memory(compiled)
  assert m.peak_bytes == xla_peak(make_step(4, None), *args)
  with pytest.raises(TypeError, match='either a function and its arguments'):
    accum_jax.compiled_memory(compiled, *args)


def test_budget_between_two_ks_picks_the_larger_k():
  args = example()
  peaks = {k: xla_peak(make_step(k, None), *args) for k in (1, 2, 4)}
  assert peaks[1] > peaks[2] > peaks[4]
  lines = []
  plan = accum_jax.plan_microbatches(
      make_step, *args, batch_argnum=2, donate_argnums=(0, 1),
      budget_bytes=(peaks[2] + peaks[4]) // 2, remat=(None,),
      print_fn=lines.append)
  assert plan.num_microbatches == 4
  assert plan.remat is None
  assert plan.peak_bytes == peaks[4]
  # Bisection over the 9 divisors of 256: 16 fits, 4 fits, 2 does not.
  assert [c.num_microbatches for c in plan.candidates] == [2, 4, 16]
  assert [c.peak_bytes for c in plan.candidates][:2] == [peaks[2], peaks[4]]
  assert [c.fits for c in plan.candidates] == [False, True, True]
  assert plan.skipped == (1, 8, 32, 64, 128, 256)
  assert '<- chosen' in lines[0] and lines[0] == plan.table()
  header, *rows, note = lines[0].splitlines()
  assert [int(r.split()[0]) for r in rows] == [1, 2, 4, 8, 16, 32, 64, 128,
                                               256]
  skipped_rows = [int(r.split()[0]) for r in rows if 'skipped' in r]
  assert skipped_rows == list(plan.skipped)
  assert rows[2].endswith('<- chosen') and 'skipped' in note


DIVISORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@pytest.fixture(scope='module')
def all_peaks():
  """Every candidate's peak, compiled one by one (the exhaustive search)."""
  args = example()
  return {k: accum_jax.compiled_memory(make_step(k, None), *args,
                                       donate_argnums=(0, 1)).peak_bytes
          for k in DIVISORS}


@pytest.mark.parametrize('budget_k', [1, 256])  # the two ends
def test_bisection_compiles_log_n_and_agrees_with_exhaustive(all_peaks,
                                                             budget_k):
  budget = all_peaks[budget_k]
  exhaustive = min(k for k in DIVISORS if all_peaks[k] <= budget)
  built = []

  def counting_make_step(k, remat):
    built.append(k)
    return make_step(k, remat)

  plan = accum_jax.plan_microbatches(
      counting_make_step, *example(), batch_argnum=2, donate_argnums=(0, 1),
      budget_bytes=budget, remat=(None,), print_fn=None)
  assert plan.num_microbatches == exhaustive == budget_k
  assert plan.peak_bytes == all_peaks[exhaustive]
  assert len(built) == len(set(built)) <= math.ceil(math.log2(9)) + 1
  assert sorted(built) == [c.num_microbatches for c in plan.candidates]
  assert sorted(set(DIVISORS) - set(built)) == list(plan.skipped)


def test_bisection_when_the_peak_is_not_monotone_in_k():
  # The output is `size[k]` floats: k = 4 needs more than k = 2 and 8.
  size = {1: 4096, 2: 64, 4: 4096, 8: 64, 16: 64}

  def make(k, remat):
    del remat
    return lambda x: jnp.broadcast_to(x.sum(), (size[k],))

  x = jax.ShapeDtypeStruct((16, 4), jnp.float32)
  plan = accum_jax.plan_microbatches(make, x, batch_argnum=0,
                                     budget_bytes=4096, remat=(None,),
                                     print_fn=None)
  # Not the smallest k that fits (2), but one that fits whose next smaller
  # candidate was compiled and does not.
  assert plan.num_microbatches == 8
  assert [(c.num_microbatches, c.fits) for c in plan.candidates] == [
      (4, False), (8, True), (16, True)]
  assert plan.skipped == (1, 2)


# Flops with the loop trip counts: an MLP of D square matmuls, and the same
# layers under a lax.scan (a loop nested in the micro-batch loop).
FB, FW, FD = 256, 128, 3


def dense_loss(ws, x):
  for w in ws:
    x = jax.nn.relu(x @ w)
  return jnp.mean(x ** 2)


def scanned_loss(ws, x):
  x, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, ws)
  return jnp.mean(x ** 2)


def flops_step(loss, k, unroll):
  tx = accum_jax.accumulate(optax.sgd(0.1), k)
  grad_step = accum_jax.value_and_update(loss, tx, unroll=unroll)

  def step(params, opt_state, batch):
    loss, updates, opt_state = grad_step(params, opt_state, batch)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@pytest.mark.parametrize('loss', [dense_loss, scanned_loss])
def test_flops_count_every_trip_of_the_loops(loss):
  matmul = 2 * FB * FW * FW  # one layer's forward over the whole batch
  if loss is dense_loss:
    params = [jnp.zeros((FW, FW))] * FD
    # Forward, weight gradients, input gradients but the first layer's.
    hand = matmul * (3 * FD - 1)
  else:
    params = jnp.zeros((FD, FW, FW))
    hand = matmul * 3 * FD  # the scan's backward also does the first layer's
  opt_state = accum_jax.accumulate(optax.sgd(0.1), 1).init(params)
  batch = jax.ShapeDtypeStruct((FB, FW), jnp.float32)
  flops = []
  for k, unroll in ((1, 1), (2, 1), (4, 2), (8, 3)):
    compiled = jax.jit(flops_step(loss, k, unroll),
                       donate_argnums=(0, 1)).lower(
                           params, opt_state, batch).compile()
    flops.append(accum_jax.compiled_memory(compiled).flops)
    if k == 2:  # what XLA reports: the loop body counted once
      assert compiled.cost_analysis()['flops'] < 0.6 * hand
  # The same work, however split and unrolled (k = 8, unroll = 3: 2 trips
  # of 3 micro-batches, and 2 more after the loop): the hand count plus the
  # elementwise ops (about 1%).
  assert hand <= min(flops) and max(flops) <= 1.03 * hand, flops
  assert max(flops) <= 1.01 * min(flops), flops


def test_compiled_memory_flops_of_loops_nested_and_in_branches():
  w = jnp.ones((64, 64))
  matmul = 2 * 64**3
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)

  def loop(n):
    return lambda h: jax.lax.fori_loop(0, n, lambda i, h: h @ w, h)

  nested = accum_jax.compiled_memory(
      lambda h: jax.lax.fori_loop(0, 10, lambda i, h: loop(5)(h), h), x)
  assert nested.flops == pytest.approx(50 * matmul, rel=1e-3)
  # XLA costs a conditional as its costliest branch.
  branches = accum_jax.compiled_memory(
      lambda h, p: jax.lax.cond(p, loop(10), loop(3), h), x,
      jax.ShapeDtypeStruct((), jnp.bool_))
  assert branches.flops == pytest.approx(10 * matmul, rel=1e-3)


def test_flops_fall_back_to_xlas_figure_with_a_warning(monkeypatch):
  w = jnp.ones((64, 64))
  compiled = jax.jit(lambda h: jax.lax.fori_loop(0, 10, lambda i, h: h @ w, h)
                     ).lower(jnp.ones((64, 64))).compile()

  def missing():
    raise ImportError('no hlo_module_cost_analysis')

  # The module compiled_memory runs in (the doctests may import another copy).
  monkeypatch.setitem(accum_jax.compiled_memory.__globals__,
                      '_hlo_cost_functions', missing)
  with pytest.warns(UserWarning, match='counts each loop body once'):
    flops = accum_jax.compiled_memory(compiled).flops
  assert flops == compiled.cost_analysis()['flops']
  assert flops == pytest.approx(2 * 64**3, rel=1e-3)  # one trip of ten


def test_prefers_no_remat_when_both_fit_and_remat_when_only_it_fits():
  args = example()
  plain = accum_jax.compiled_memory(make_step(1, None), *args,
                                    donate_argnums=(0, 1))
  remat = accum_jax.compiled_memory(make_step(1, NAMES), *args,
                                    donate_argnums=(0, 1))
  # Saving only the tagged layer outputs lowers the peak, costs flops.
  assert remat.peak_bytes < 0.9 * plain.peak_bytes
  assert remat.flops > plain.flops

  both = accum_jax.plan_microbatches(
      make_step, *args, batch_argnum=2, donate_argnums=(0, 1),
      budget_bytes=plain.peak_bytes, num_microbatches=(1,),
      remat=(NAMES, None), print_fn=None)
  assert (both.num_microbatches, both.remat) == (1, None)
  assert both.flops == plain.flops

  only_remat = accum_jax.plan_microbatches(
      make_step, *args, batch_argnum=2, donate_argnums=(0, 1),
      budget_bytes=(plain.peak_bytes + remat.peak_bytes) // 2,
      num_microbatches=(1,), remat=(None, NAMES), print_fn=None)
  assert (only_remat.num_microbatches, only_remat.remat) == (1, NAMES)
  assert only_remat.peak_bytes == remat.peak_bytes


def test_impossible_budget_raises_with_the_table():
  args = example()
  with pytest.raises(ValueError, match=r'No plan fits the budget of 1000 '
                     r'bytes .*even k=4 .*\n.*k +remat'):
    accum_jax.plan_microbatches(
        make_step, *args, batch_argnum=2, donate_argnums=(0, 1),
        budget_bytes=1000, num_microbatches=(1, 4), remat=(None,),
        print_fn=None)


def test_bad_arguments():
  args = example()
  with pytest.raises(ValueError, match=r'\[3\] do not divide the batch size '
                     '256'):
    accum_jax.plan_microbatches(make_step, *args, batch_argnum=2,
                                budget_bytes=10**9, num_microbatches=(2, 3))
  with pytest.raises(ValueError, match='batch_argnum=5 is out of range'):
    accum_jax.plan_microbatches(make_step, *args, batch_argnum=5,
                                budget_bytes=10**9)
  if accum_jax._planner.device_memory_budget() is None:
    with pytest.raises(ValueError, match='reports no memory capacity'):
      accum_jax.plan_microbatches(make_step, *args, batch_argnum=2)


def test_never_runs_the_step():
  ran = []

  def spying_make_step(k, remat):
    step = make_step(k, remat)

    def spy(*args):
      jax.debug.callback(lambda: ran.append(k))
      return step(*args)

    return spy

  params, opt_state, _ = example()
  batch = jnp.ones((B, WIDTH))
  plan = accum_jax.plan_microbatches(
      spying_make_step, params, opt_state, batch, batch_argnum=2,
      donate_argnums=(0, 1), budget_bytes=10**9, num_microbatches=(1, 2),
      print_fn=None)
  assert plan.num_microbatches == 1
  assert ran == []
  assert not params[0].is_deleted()  # nothing was donated either


def test_estimate_matches_the_benchmark_figure():
  pytest.importorskip('flax')
  from benchmarks import contenders, models, run  # pylint: disable=g-import-not-at-top

  model = models.make('mlp', 'tiny', jnp.float32)
  inner = optax.adam(1e-3)
  make = contenders.make_accum_step(model, inner)
  opt_state = accum_jax.accumulate(inner, 1).init(model.params)
  args = (model.params, opt_state, model.state, model.batch,
          jax.random.key(1))
  peaks = {k: accum_jax.compiled_memory(make(k, None), *args,
                                        donate_argnums=contenders.DONATE)
           .peak_bytes for k in (1, 2)}
  plan = accum_jax.plan_microbatches(
      make, *args, batch_argnum=3, donate_argnums=contenders.DONATE,
      budget_bytes=peaks[2], num_microbatches=(1, 2), remat=(None,),
      print_fn=None)
  assert plan.num_microbatches == 2
  cell = run.Cell('accum', model, inner, plan.num_microbatches)
  assert cell.memory.peak_bytes == plan.peak_bytes
