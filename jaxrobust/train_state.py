"""The train state: a plain pytree of named modules, created directly sharded.

``TrainState`` holds only arrays -- the step, one :class:`ModuleState` (params,
batch stats, optax state) per module, and the run's root rng key -- so orbax
saves and restores it as is and the sharding rules apply to every leaf by path
(``modules/classifier/params/conv1/kernel``,
``modules/classifier/opt_state/.../conv1/kernel``). The flax models and optax
transformations are not part of it: they live in
:class:`jaxrobust.modules.Module` and the step closes over them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp

from jaxrobust.modules import CLASSIFIER, Module

Array = jax.Array


@flax.struct.dataclass
class ModuleState:
  """One module's variables (``params``, ``batch_stats``) and optimizer state."""
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class TrainState:
  """The step, every module's :class:`ModuleState` by name, the root key and
  the loss terms' moving averages."""
  step: Array  # int32 scalar: number of steps applied
  modules: dict[str, ModuleState]
  rng: Array  # root key (uint32[2]); each step uses fold_in(rng, step)
  # moving averages of loss terms (losses.normalize_momentum); empty unless used
  loss_stats: dict[str, Array] = flax.struct.field(default_factory=dict)

  @property
  def classifier(self) -> ModuleState:
    return self.modules[CLASSIFIER]

  @property
  def params(self) -> Any:
    """The classifier's parameters (the default module)."""
    return self.classifier.params

  @property
  def batch_stats(self) -> Any:
    return self.classifier.batch_stats


def create_state(modules: Mapping[str, Module], rng: Array,
                 loss_stats: Sequence[str] = ()) -> TrainState:
  """A fresh state: initial parameters, zero optimizer states, step 0, and a
  zero moving average for each term key in ``loss_stats``."""
  init_rng, run_rng = jax.random.split(rng)
  states = {}
  for name, m in modules.items():
    params, batch_stats = m.init(m.init_rng(init_rng))
    states[name] = ModuleState(params=params, batch_stats=batch_stats,
                               opt_state=m.tx.init(params))
  return TrainState(step=jnp.zeros((), jnp.int32), modules=states, rng=run_rng,
                    loss_stats={k: jnp.zeros((), jnp.float32) for k in loss_stats})


# XLA:CPU spends most of an initialisation program's compile time optimising
# the unrolled threefry hashes of the initialisers with LLVM at -O3 (about 4x
# -O1's time for a WRN-10-1); at -O1 the values are bitwise the same
# (tests/test_init_compile.py checks each kind of initialiser).
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options(mesh: jax.sharding.Mesh) -> dict[str, Any] | None:
  """XLA options for compiling :func:`create_state` on ``mesh``: LLVM -O1 on
  CPU (faster to compile, same values), the backend's defaults elsewhere."""
  platforms = {d.platform for d in mesh.devices.flat}
  return dict(_CPU_INIT_OPTIONS) if platforms == {"cpu"} else None


def abstract_state(modules: Mapping[str, Module], loss_stats: Sequence[str] = ()) -> TrainState:
  """Shapes and dtypes of the state, without computing anything."""
  return jax.eval_shape(lambda r: create_state(modules, r, loss_stats), jax.random.PRNGKey(0))
