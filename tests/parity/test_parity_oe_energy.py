"""Parity: Outlier Exposure and energy-bounded fine-tuning
(``wetliu/energy_ood`` ``CIFAR/train.py:172-205``, ``--score OE`` / ``energy``)
against jaxrobust's step with an ``outliers`` stream and the library's
``outlier_exposure`` / ``energy_hinge`` terms.

Inputs are normalised with mean = std = 0.5 on both sides (EN's loader uses
CIFAR's statistics, a data-pipeline constant outside the ported step; 0.5 makes
the normalisation exact in float32, see ``common.images``).

Both sides run the in-distribution batch and the outliers through ONE
train-mode forward pass (BatchNorm sees them together). jaxrobust concatenates
the streams in sorted name order (``outliers`` before ``train``), the
reference in-distribution first; that changes nothing but the order of a
floating-point sum.

Nothing is mimicked or overridden: the default config is the reference
(learning-rate sequence, BatchNorm arithmetic: see ``test_parity_hpt``), and
nothing is pinned here. OE's batches come from another seed than energy's
(``SEED``: a float32 ReLU-gate flip on seed 1's trajectory).
"""

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from . import common  # noqa: E402
from . import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow]

LR = {"OE": 0.01, "energy": 0.001}  # EN fine-tunes at 0.001; the hinge at m_in=-25 is large
OUT_BATCH = 2 * common.BATCH  # EN: in-distribution 128 + outliers 256
# Margins: m_in is EN's argparse default; m_out is set above the outliers' energies of a
# fresh model (about -2.4) so that both hinges are active (run.sh's m_out = -5 would leave
# the outlier hinge at 0 from a random start).
M_IN, M_OUT = -25.0, -1.0

OVERRIDES: dict = {}  # the default config is the reference


# The batches' seed. OE's is 3: from seed 1's batches, one ReLU gate of the last
# BatchNorm's output flips in jaxrobust's float32 forward pass at the 4th update
# (float64 value 1.7e-6, jaxrobust's float32 -2.5e-7; its float32 errors on that layer
# are PyTorch's, mean 5.7e-7 vs 5.2e-7, max 4.4e-6 vs 4.0e-6) but not in the port's
# float32 run, and the one gate's share of the gradient (~1e-4 of a BatchNorm bias's)
# grows to 6.8e-3 (block2.layer.0.bn2.bias) after 20 steps against a floor of 4.8e-4: a
# float32 event the single float32-vs-float64 floor does not sample. Seeds 2-5 pass
# (2 and 4 with a flip in both float32 runs, so the floor covers it).
SEED = {"OE": 3, "energy": 1}


def batches(score: str):
  rng = np.random.default_rng(SEED[score])
  out = []
  for b in common.labelled_batches(seed=SEED[score]):
    b["outliers"] = common.stream_batch(common.noise_images(rng, OUT_BATCH),
                                        np.full(OUT_BATCH, -1))
    out.append(b)
  return out


def config(score: str, overrides=None):
  c = common.base_config(LR[score])
  c.streams.outliers = {"data": "tiny_images", "batch_size": OUT_BATCH}
  if score == "OE":
    c.losses.outlier_exposure = {"weight": 0.5, "stream": "outliers"}  # train.py:198
  else:
    c.losses.energy_hinge = {"weight": 0.1, "m_in": M_IN, "m_out": M_OUT}  # train.py:196
  return common.with_overrides(c, overrides)


def jax_run(score: str, overrides=None) -> common.JaxRun:
  return common.cached_jax_run(
      f"{score}:{common.overrides_key(overrides)}",
      lambda: common.run_jax(config(score, overrides), batches(score)))


def compare(score: str, overrides=None, dep: ref.Departures = ref.REFERENCE) -> common.Report:
  bs = batches(score)

  def inputs(net, t):
    return (common.cast(net, common.to_torch_input(bs[t]["train"]["image"])),
            torch.from_numpy(bs[t]["train"]["label"].astype(np.int64)),
            common.cast(net, common.to_torch_input(bs[t]["outliers"]["image"])))

  def step(net, optimizer, scheduler, t):
    x_in, y, x_out = inputs(net, t)
    return ref.oe_energy_train_step(net, optimizer, scheduler, x_in, y, x_out, score=score,
                                    m_in=M_IN, m_out=M_OUT, dep=dep)

  return common.compare_family(f"{score} fine-tuning", jax_run(score, overrides), LR[score],
                               step)


def test_oe_finetune_step_parity():
  compare("OE", OVERRIDES).assert_parity()


def test_energy_finetune_step_parity():
  compare("energy", OVERRIDES).assert_parity()
  # Both hinges were active (the outlier one pulls the outliers' energies up).
  j = jax_run("energy", OVERRIDES)
  assert all(m["train/energy"] > M_IN for m in j.metrics)
  assert j.metrics[0]["outliers/energy"] < M_OUT
