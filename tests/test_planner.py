"""Tests of accum_jax.compiled_memory and accum_jax.plan_microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import heavy_layers

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
  # It tried 1, 2 and 4 (the divisors of 256 in order) and stopped there.
  assert [c.num_microbatches for c in plan.candidates] == [1, 2, 4]
  assert [c.peak_bytes for c in plan.candidates] == [peaks[1], peaks[2],
                                                      peaks[4]]
  assert [c.fits for c in plan.candidates] == [False, False, True]
  assert '<- chosen' in lines[0] and lines[0] == plan.table()


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
      budget_bytes=plain.peak_bytes, remat=(NAMES, None), print_fn=None)
  assert (both.num_microbatches, both.remat) == (1, None)
  assert both.flops == plain.flops

  only_remat = accum_jax.plan_microbatches(
      make_step, *args, batch_argnum=2, donate_argnums=(0, 1),
      budget_bytes=(plain.peak_bytes + remat.peak_bytes) // 2,
      remat=(None, NAMES), print_fn=None)
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
      donate_argnums=(0, 1), budget_bytes=10**9, print_fn=None)
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
