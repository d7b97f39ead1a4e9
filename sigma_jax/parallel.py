"""Device mesh, logical-axis sharding rules, sharded initialisation and batch placement.

The one place where the mesh is built (DESIGN §5). Parameters and activations carry logical axis
names (`embed`, `mlp`, `heads`, ...); a rules table (`config.axis_rules`, a tuple of
`(logical_name, mesh_axes)` pairs) maps them to the mesh axes `data`, `fsdp`, `model`.

Typical use:

  mesh = parallel.make_mesh(config.mesh)
  graphdef, params = parallel.init_sharded(
      lambda: backbone.Decoder(config.model, rngs=nnx.Rngs(config.seed)), mesh, config.axis_rules)
  shardings = parallel.state_shardings(params, mesh, config.axis_rules)
  batch = parallel.shard_batch(numpy_batch, mesh, config.axis_rules)

Inside a jitted step, `with parallel.activation_sharding(mesh, rules):` turns the model's
`parallel.constrain(x, names)` calls into sharding constraints on its activations.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

Rules = Sequence[tuple[str, Any]]


def _mesh_dims(mesh_cfg: Any) -> list[int]:
  if isinstance(mesh_cfg, Mapping):
    get = mesh_cfg.__getitem__
  else:  # ml_collections.ConfigDict or any object with attributes
    get = lambda k: getattr(mesh_cfg, k)
  try:
    return [int(get(a)) for a in MESH_AXES]
  except (KeyError, AttributeError) as e:
    raise ValueError(f"mesh config must set {MESH_AXES}; got {mesh_cfg!r}") from e


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'model') mesh.

  Args:
    mesh_cfg: mapping or ConfigDict with integer fields `data`, `fsdp`, `model`. At most one of
      them may be -1, meaning "all remaining devices".
    devices: devices to use; default `jax.devices()` (all devices of all processes).

  Returns:
    A `jax.sharding.Mesh` with every axis of type `AxisType.Auto` (jax.make_mesh defaults to
    Explicit, which rejects ordinary while-loop code).

  Raises:
    ValueError: a size is 0 or below -1, more than one -1, or the sizes do not match the
      number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  dims = _mesh_dims(mesh_cfg)
  named = dict(zip(MESH_AXES, dims))
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh sizes must be positive or -1; got {named}")
  free = [i for i, d in enumerate(dims) if d == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {named}")
  fixed = math.prod(d for d in dims if d != -1)
  if free:
    if n % fixed:
      raise ValueError(
          f"mesh {named}: the fixed axes need a multiple of {fixed} devices, but there are {n}")
    dims[free[0]] = n // fixed
  elif fixed != n:
    raise ValueError(f"mesh {named} has {fixed} devices, but there are {n} devices")
  return jax.make_mesh(tuple(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _as_axes(mesh_axes: Any) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec: when a later dimension's rule names a mesh axis
  already taken by an earlier dimension, that mesh axis is dropped for the later dimension (so
  `('batch', 'embed')` with batch->('data','fsdp') and embed->'fsdp' gives P(('data','fsdp'))).

  Args:
    names: one logical name (or None: replicated) per array dimension.
    rules: (logical_name, mesh_axes) pairs; mesh_axes is None, a mesh axis name or a tuple of
      them. The first pair for a name wins.

  Returns:
    The PartitionSpec, one entry per dimension.

  Raises:
    ValueError: a name that the rules do not mention (usually a typo).
  """
  table: dict[str, Any] = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    axes = tuple(a for a in _as_axes(table[name]) if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def logical_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules) -> NamedSharding:
  """`NamedSharding` on `mesh` for an array whose dimensions have logical `names`."""
  return NamedSharding(mesh, logical_to_spec(names, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh` (scalars, metrics, step counters)."""
  return NamedSharding(mesh, P())


def state_specs(state: Any, rules: Rules) -> Any:
  """PartitionSpecs for an NNX state from its `nnx.with_partitioning` metadata.

  Args:
    state: an `nnx.State` (concrete or abstract, e.g. from `nnx.eval_shape`), or a Module.
    rules: logical axis rules.

  Returns:
    A tree with the structure of `state` whose leaves are mesh PartitionSpecs. Variables without
    partitioning metadata are replicated.
  """
  logical = nnx.get_partition_spec(state)
  return jax.tree.map(lambda p: logical_to_spec(tuple(p), rules), logical,
                      is_leaf=lambda x: isinstance(x, P))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` with each dimension that its mesh axes do not divide evenly replicated instead.

  E.g. a vocabulary of 1,055 rows cannot be split over model = 2: the embedding keeps its
  other dimension's sharding and is replicated along the vocabulary. Parameter shapes never
  depend on the mesh, so 1 and 8 devices still train the same model.
  """
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for dim, axes in zip(shape, entries):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    parts = math.prod(mesh.shape[a] for a in names)
    out.append(axes if dim % parts == 0 else None)
  return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an NNX state (see `state_specs`, `fit_spec`); usable as jit
  in/out_shardings."""
  return jax.tree.map(lambda p, x: NamedSharding(mesh, fit_spec(p, x.shape, mesh)),
                      state_specs(state, rules), state, is_leaf=lambda x: isinstance(x, P))


def init_sharded(model_factory: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Rules) -> tuple[nnx.GraphDef, nnx.State]:
  """Creates an NNX module whose parameters are born sharded (never replicated first).

  The factory is traced once abstractly (`nnx.eval_shape`) to read each variable's logical
  axes, then run under `jax.jit` with those shardings as `out_shardings`, so every device only
  materialises its own shard.

  Args:
    model_factory: zero-argument callable building the module, including its `nnx.Rngs`
      (e.g. `lambda: Decoder(cfg, rngs=nnx.Rngs(0))`). It must be deterministic.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (graphdef, state): the functional split of the module (state holds every variable, not only
    nnx.Param); `nnx.merge(graphdef, state)` gives
    the module back. Get its shardings again with `state_shardings(state, mesh, rules)`.
  """
  abstract = nnx.eval_shape(model_factory)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  init = jax.jit(lambda: nnx.split(model_factory())[1], out_shardings=shardings)
  state = init()
  return graphdef, state


def optimizer_shardings(tx: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state: parameter-shaped entries follow the parameters.

  Args:
    tx: the optax GradientTransformation.
    params: the parameters (concrete or abstract).
    param_shardings: shardings of `params`, same structure.
    mesh: the device mesh; other entries (step counts) are replicated on it.

  Returns:
    A tree with the structure of `tx.init(params)` whose leaves are NamedShardings.
  """
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules) -> NamedSharding:
  """Sharding of an array with a leading logical 'batch' axis and `ndim` dimensions."""
  return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Puts a pytree of host arrays on the mesh, split along the leading 'batch' axis.

  Uses `jax.make_array_from_process_local_data`, so the same call serves multi-host runs: there
  each process passes its own slice of the global batch (leading dim = global batch / process
  count) and the global shape is inferred.

  Args:
    batch: pytree of numpy arrays (or scalars), each with a leading batch dimension [B, ...].
    mesh: the device mesh.
    rules: logical axis rules (the 'batch' rule decides which mesh axes split B).

  Returns:
    The same pytree of global `jax.Array`s.
  """
  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.make_array_from_process_local_data(replicated(mesh), x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

  return jax.tree.map(put, batch)


def train_state(tx: Any, params: Any, mesh: Mesh, rules: Rules) -> tuple[dict, dict]:
  """A fresh {'params', 'opt', 'step'} training state, born sharded, and its shardings.

  Parameters keep their logical shardings, the optimizer state follows them
  (`optimizer_shardings`), the step counter is replicated.
  """
  param_sh = state_shardings(params, mesh, rules)
  state_sh = {"params": param_sh, "opt": optimizer_shardings(tx, params, param_sh, mesh),
              "step": replicated(mesh)}
  state = {"params": params, "opt": jax.jit(tx.init, out_shardings=state_sh["opt"])(params),
           "step": put_replicated(np.zeros((), np.int32), mesh)}
  return state, state_sh


def put_replicated(x: Any, mesh: Mesh) -> Any:
  """A host array (the same on every process) as a global array replicated over ``mesh``."""
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(replicated(mesh), np.asarray(a)), x)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: Mesh,
                            rules: Rules) -> jax.Array:
  """`jax.lax.with_sharding_constraint` by logical axis names (inside jit)."""
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, names, rules))


class _ActivationContext(threading.local):
  mesh: Mesh | None = None
  rules: Rules = ()


_ACTIVATIONS = _ActivationContext()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
  """Turns on `constrain` (activation sharding constraints) while tracing inside this block.

  Use it inside the jitted step function (so it is active whenever the step is traced):

    def train_step(state, batch):
      with parallel.activation_sharding(mesh, rules):
        ...
  """
  old = (_ACTIVATIONS.mesh, _ACTIVATIONS.rules)
  _ACTIVATIONS.mesh, _ACTIVATIONS.rules = mesh, tuple(rules)
  try:
    yield
  finally:
    _ACTIVATIONS.mesh, _ACTIVATIONS.rules = old


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under `activation_sharding`; identity outside it.

  Lets model code name its activations' axes without knowing about meshes.
  """
  if _ACTIVATIONS.mesh is None:
    return x
  return with_logical_constraint(x, names, _ACTIVATIONS.mesh, _ACTIVATIONS.rules)


def check_batch_divisible(field: str, batch_size: int, mesh) -> None:
  """A global batch must split evenly over the data-parallel devices (mesh.data x mesh.fsdp)."""
  dp = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if int(batch_size) % dp:
    raise ValueError(f"{field}={batch_size} is not divisible by the {dp} data-parallel devices "
                     f"(mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
