"""Energy-based OOD detection (Liu, Wang, Owens, Li, NeurIPS 2020).

**Score.** The free energy ``E(x; T) = −T · logsumexp_k f_k(x)/T``; lower is
more in-distribution, so the detection score is ``−E``
(:func:`jaxrobust.scores.energy`, registered as ``energy``; ``temperature``
defaults to 1 as the reference's ``--T``).

**Energy-bounded fine-tuning** (``wetliu/energy_ood`` ``CIFAR/train.py``,
``--score energy``): with ``E_in``, ``E_out`` computed at T = 1 on one forward
pass over the in-distribution batch and the auxiliary outliers,

    L = CE(in) + λ · [ mean(relu(E_in − m_in)²) + mean(relu(m_out − E_out)²) ],

each hinge averaged over its own batch (not over the joint batch, as
pytorch-ood's ``EnergyRegularizedLoss`` does), λ = 0.1. The reference's
argparse defaults are m_in = −25, m_out = −7; its ``run.sh`` uses m_in = −23,
m_out = −5 for CIFAR-10 and −27 / −5 for CIFAR-100 (the paper's §4.1 text swaps
the search ranges; the code is authoritative). The recipe fine-tunes a
pre-trained model for 10 epochs at lr 0.001 (cosine), in-distribution batch 128
+ outlier batch 256.

Registered loss term ``energy_hinge(stream='train', outlier_stream='outliers',
m_in=-25, m_out=-7)`` -- the bracket only; the CE is the usual
``cross_entropy`` term and λ is the term's ``weight``. ``m_in`` and ``m_out``
may be artifact references (``'artifact:margins/margins:m_in'``), e.g. written
by the ``energy_margins`` stage task.

**Choosing m_in / m_out** -- the question the energy repository's users ask
most (issues #13, #21): the maintainers advise margins near the pre-trained
model's average in- and out-of-distribution energies, else in-distribution
accuracy degrades. :func:`propose_margins` turns the energies of a trained
model into margins (by default the medians: ``m_in`` = median E_in, ``m_out``
= median E_out) and the ``energy_margins`` stage task computes those energies
with ``predict`` and prints them with their quantiles.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import scores as scores_lib
from jaxrobust.losses import LOSSES, LossInputs, masked_mean
from jaxrobust.registry import RegistryError
from jaxrobust.tasks import TASKS, StageContext

Array = jax.Array
log = logging.getLogger("jaxrobust")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def free_energy(logits: Array, temperature: float = 1.0) -> Array:
  """``E(x; T) = −T · logsumexp(f / T)`` per example (lower = in-distribution)."""
  return -scores_lib.energy(jnp.asarray(logits, jnp.float32), temperature)


def energy_hinge(logits_in: Array, logits_out: Array, *, m_in: float, m_out: float,
                 in_mask: Array | None = None, out_mask: Array | None = None) -> Array:
  """``mean(relu(E_in − m_in)²) + mean(relu(m_out − E_out)²)`` at T = 1, each
  mean over its own (valid) examples; the λ and the cross-entropy of the full
  loss are not included."""
  e_in, e_out = free_energy(logits_in), free_energy(logits_out)
  return (masked_mean(jax.nn.relu(e_in - m_in) ** 2, in_mask)
          + masked_mean(jax.nn.relu(m_out - e_out) ** 2, out_mask))


def _check_margins(options: Mapping[str, Any], num_classes: int | None) -> None:
  del num_classes
  m_in, m_out = options.get("m_in"), options.get("m_out")
  if isinstance(m_in, str) or isinstance(m_out, str):
    return  # artifact references, checked once loaded
  if not m_in < m_out:
    raise RegistryError(f"energy_hinge needs m_in < m_out (in-distribution energies are the "
                        f"lower ones); got m_in={m_in}, m_out={m_out}.")


@LOSSES.register("energy_hinge", info={"check": _check_margins})
def energy_hinge_term(inputs: LossInputs, *, stream: str = "train",
                      outlier_stream: str = "outliers", m_in: float = -25.0,
                      m_out: float = -7.0):
  """Liu et al.'s energy-bounded regulariser on ``stream`` (in-distribution)
  and ``outlier_stream``; weight it by λ = 0.1 in ``config.losses``."""
  a, b = inputs.outputs[stream], inputs.outputs[outlier_stream]
  ma, mb = inputs.batch[stream]["mask"], inputs.batch[outlier_stream]["mask"]
  value = energy_hinge(a["logits"], b["logits"], m_in=m_in, m_out=m_out, in_mask=ma,
                       out_mask=mb)
  return value, {f"{stream}/energy": masked_mean(free_energy(a["logits"]), ma),
                 f"{outlier_stream}/energy": masked_mean(free_energy(b["logits"]), mb)}


def propose_margins(energies_in: np.ndarray, energies_out: np.ndarray, *,
                    q_in: float = 0.5, q_out: float = 0.5) -> dict[str, Any]:
  """Margins from a trained model's energies: ``m_in`` = the ``q_in`` quantile
  of the in-distribution energies, ``m_out`` = the ``q_out`` quantile of the
  outliers' (medians by default: the maintainers' "near the average" advice).

  When the model does not separate the two yet (``m_out <= m_in``: the
  outliers already have the lower energies), ``m_out`` becomes ``m_in`` plus
  the larger standard deviation of the two sets, so the hinge pushes them
  apart, and ``inverted`` is set in the result. Returns the margins and the
  quantiles seen.
  """
  e_in = np.asarray(energies_in, np.float64)
  e_out = np.asarray(energies_out, np.float64)
  if e_in.size == 0 or e_out.size == 0:
    raise ValueError("propose_margins needs in-distribution and outlier energies.")
  m_in, m_out = float(np.quantile(e_in, q_in)), float(np.quantile(e_out, q_out))
  seen = {"in": {str(q): float(np.quantile(e_in, q)) for q in QUANTILES},
          "out": {str(q): float(np.quantile(e_out, q)) for q in QUANTILES},
          "in_mean": float(e_in.mean()), "out_mean": float(e_out.mean())}
  inverted = not m_in < m_out
  if inverted:
    gap = max(float(e_in.std()), float(e_out.std()), 1e-3)
    log.warning("energy margins: the outliers' %s-quantile energy %.4g is not above the "
                "in-distribution %s-quantile %.4g; m_out set to m_in + %.4g.", q_out, m_out,
                q_in, m_in, gap)
    m_out = m_in + gap
  return {"m_in": m_in, "m_out": m_out, "inverted": inverted, "energies": seen}


@TASKS.register("energy_margins")
def energy_margins_task(ctx: StageContext, *, checkpoint: str, outliers: str,
                        split: str = "train", q_in: float = 0.5, q_out: float = 0.5
                        ) -> dict[str, float]:
  """Proposes ``m_in``/``m_out`` (:func:`propose_margins`) from the energies
  of a checkpoint on the task's ``split`` and on ``outliers``
  (``'dataset[/config]:split'``); prints them and writes the JSON artifact
  ``margins`` (``artifact:<stage>/margins:m_in``)."""
  from jaxrobust.tasks import predict_outputs
  name, _, out_split = outliers.rpartition(":")
  if not name:
    raise RegistryError(f"config.stages.{ctx.name}.outliers={outliers!r} must be "
                        "'dataset[/config]:split'.")
  e_in = -predict_outputs(ctx, checkpoint=checkpoint, split=split, fields=("energy",))["energy"]
  e_out = -predict_outputs(ctx, checkpoint=checkpoint, data=name, split=out_split,
                           fields=("energy",))["energy"]
  proposal = propose_margins(e_in, e_out, q_in=q_in, q_out=q_out)
  seen = proposal["energies"]
  print(f"energy_margins: in-distribution energies (quantiles {QUANTILES}): "
        f"{[round(v, 3) for v in seen['in'].values()]}; outliers ({outliers}): "
        f"{[round(v, 3) for v in seen['out'].values()]}; proposed m_in={proposal['m_in']:.3f}, "
        f"m_out={proposal['m_out']:.3f}", flush=True)
  ctx.artifacts.save("margins", proposal)
  return {"m_in": proposal["m_in"], "m_out": proposal["m_out"],
          "inverted": float(proposal["inverted"]),
          "energy_in_mean": seen["in_mean"], "energy_out_mean": seen["out_mean"]}
