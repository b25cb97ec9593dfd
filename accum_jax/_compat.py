"""JAX names that moved between the supported versions.

Each function here is the newer JAX API, falling back to its older spelling
on the JAX versions that lack it, so that the rest of the package (and its
tests and examples) can be written against one API.
"""

import jax


def _version(v: str) -> tuple[int, ...]:
  return tuple(int(p) for p in v.split('.')[:3] if p.isdigit())


# Before jax 0.10.2, XLA:CPU copies a parameter-sized sum into its loop when
# the sum is read after the loop before its mean is taken (measured on 0.7.0:
# 'skip_step' reading the window's finiteness there cost 1.20x a hand-written
# loop's peak, as the noise scale's norm does): there the gradients are
# checked per micro-batch instead.
READS_SUM_AFTER_LOOP_IN_PLACE = _version(jax.__version__) >= (0, 10, 2)


def pcast(x, axis_name, *, to: str):
  """``jax.lax.pcast(x, axis_name, to=to)``; missing before jax 0.8.

  On older jax only ``to='varying'`` is available, as ``jax.lax.pvary``.

  Args:
    x: a pytree of arrays.
    axis_name: a manual mesh axis name, or a tuple of them.
    to: the target of the cast; ``'varying'`` marks ``x`` device-varying
      over ``axis_name`` (a no-op at run time).

  Returns:
    ``x``, cast.
  """
  if hasattr(jax.lax, 'pcast'):
    return jax.lax.pcast(x, axis_name, to=to)
  if to != 'varying':
    raise ValueError(
        f"pcast(..., to={to!r}) needs jax.lax.pcast (jax >= 0.8); this jax "
        f"{jax.__version__} has only to='varying' (jax.lax.pvary).")
  return jax.lax.pvary(x, axis_name)


def set_mesh(mesh):
  """``jax.set_mesh(mesh)``, as a context manager; missing before jax 0.7.1.

  Older jax sets the mesh with ``jax.sharding.use_mesh``, a context manager
  only: use ``with set_mesh(mesh):``.

  Args:
    mesh: a ``jax.sharding.Mesh``.

  Returns:
    A context manager under which ``mesh`` is the current mesh.
  """
  if hasattr(jax, 'set_mesh'):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)


def make_mesh(axis_shapes, axis_names, axis_types=None, **kwargs):
  """``jax.make_mesh`` with explicit axes by default, as on jax >= 0.9.

  Before jax 0.9 the default ``axis_types`` was ``AxisType.Auto`` (jax 0.8.1
  and 0.8.2 warn about the change); this passes ``AxisType.Explicit`` for
  every axis unless ``axis_types`` is given, so a mesh means the same on
  every supported version.

  Args:
    axis_shapes: the mesh's shape.
    axis_names: one name per mesh axis.
    axis_types: one ``jax.sharding.AxisType`` per axis; Explicit if None.
    **kwargs: passed on to ``jax.make_mesh`` (e.g. ``devices=``).

  Returns:
    A ``jax.sharding.Mesh``.
  """
  if axis_types is None:
    axis_types = (jax.sharding.AxisType.Explicit,) * len(axis_names)
  return jax.make_mesh(axis_shapes, axis_names, axis_types=axis_types,
                       **kwargs)


def enable_x64(new_val: bool = True):
  """``jax.enable_x64(new_val)``, a context manager; missing on jax 0.7.0.

  There it is ``jax.experimental.enable_x64`` (gone from jax 0.10.2).

  Args:
    new_val: whether 64-bit types are enabled inside the context.

  Returns:
    A context manager under which ``jax_enable_x64`` is ``new_val``.
  """
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(new_val)
  from jax import experimental
  return experimental.enable_x64(new_val)
