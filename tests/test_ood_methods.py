"""OOD methods against numpy ports of the reference code: OE / confidence loss
(OE ``oe_tune.py``, Confident_classifier's ``kl_div * K``), the energy hinge
(energy_ood ``train.py``), ODIN (``score_calculation.ODIN``), Mahalanobis
(``sample_estimator`` with sklearn's EmpiricalCovariance,
``get_Mahalanobis_score``); and the scores inside the OOD evaluator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance

from jaxrobust import losses, scores
from jaxrobust.methods import energy, mahalanobis, odin, outlier_exposure
from jaxrobust.registry import RegistryError

RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(24, 7)) * 4).astype(np.float32)


def _logsumexp(z):
  m = z.max(1, keepdims=True)
  return (np.log(np.exp(z - m).sum(1, keepdims=True)) + m)[:, 0]


# --- outlier exposure / confidence loss -------------------------------------------

def test_oe_matches_the_reference_formula_and_confidence_is_kl():
  z = LOGITS.astype(np.float64)
  oe_ref = -(z.mean(1) - _logsumexp(z)).mean()  # oe_tune.py, without the 0.5
  np.testing.assert_allclose(outlier_exposure.outlier_exposure_loss(LOGITS), oe_ref, rtol=1e-5)
  # Confident_classifier: F.kl_div(log_softmax, uniform) * K with the old mean
  # reduction over B x K elements = per-example KL(U || p), averaged.
  logp = z - _logsumexp(z)[:, None]
  k = z.shape[1]
  u = np.full_like(z, 1 / k)
  kl_ref = (u * (np.log(u) - logp)).mean() * k
  np.testing.assert_allclose(outlier_exposure.confidence_loss(LOGITS), kl_ref, rtol=1e-5)
  np.testing.assert_allclose(outlier_exposure.outlier_exposure_loss(LOGITS)
                             - outlier_exposure.confidence_loss(LOGITS), math.log(k), rtol=1e-6)
  # Same gradient: the terms differ by a constant.
  g1 = jax.grad(outlier_exposure.outlier_exposure_loss)(jnp.asarray(LOGITS))
  g2 = jax.grad(outlier_exposure.confidence_loss)(jnp.asarray(LOGITS))
  np.testing.assert_allclose(g1, g2, atol=1e-7)
  # Uniform logits: KL is 0, OE is log K.
  flat = np.zeros((3, 5), np.float32)
  np.testing.assert_allclose(outlier_exposure.confidence_loss(flat), 0.0, atol=1e-6)


def test_oe_ignores_padded_outliers():
  mask = np.arange(24) < 10
  garbage = LOGITS.copy()
  garbage[10:] = np.nan
  np.testing.assert_allclose(outlier_exposure.outlier_exposure_loss(garbage, mask),
                             outlier_exposure.outlier_exposure_loss(LOGITS[:10]), rtol=1e-6)


# --- energy -------------------------------------------------------------------------

def test_energy_hinge_matches_the_reference():
  z_in, z_out = LOGITS[:16].astype(np.float64), LOGITS[16:].astype(np.float64) * 0.1
  e_in, e_out = -_logsumexp(z_in), -_logsumexp(z_out)
  m_in, m_out = -8.0, -1.5
  ref = (np.maximum(e_in - m_in, 0) ** 2).mean() + (np.maximum(m_out - e_out, 0) ** 2).mean()
  got = energy.energy_hinge(z_in.astype(np.float32), z_out.astype(np.float32), m_in=m_in,
                            m_out=m_out)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_allclose(energy.free_energy(LOGITS), -_logsumexp(LOGITS.astype(np.float64)),
                             rtol=1e-5)
  np.testing.assert_allclose(scores.energy(LOGITS), -energy.free_energy(LOGITS), rtol=1e-6)


def test_energy_hinge_averages_each_side_over_its_own_batch():
  """Not over the joint batch (pytorch-ood's reduction): doubling the
  outlier batch with copies leaves the value unchanged."""
  a, b = LOGITS[:8], LOGITS[8:12] * 0.1
  one = energy.energy_hinge(a, b, m_in=-9.0, m_out=-1.0)
  two = energy.energy_hinge(a, np.concatenate([b, b]), m_in=-9.0, m_out=-1.0)
  np.testing.assert_allclose(one, two, rtol=1e-6)


def test_energy_margins_are_checked_and_proposed():
  with pytest.raises(RegistryError, match="m_in < m_out"):
    losses.build_loss({"energy_hinge": {"m_in": -5.0, "m_out": -7.0}})
  e_in = RNG.normal(-20, 2, 500)
  e_out = RNG.normal(-6, 2, 500)
  p = energy.propose_margins(e_in, e_out)
  np.testing.assert_allclose([p["m_in"], p["m_out"]], [np.median(e_in), np.median(e_out)])
  assert set(p["energies"]["in"]) == {"0.05", "0.25", "0.5", "0.75", "0.95"}
  assert not p["inverted"]
  # Outliers with the lower energies: m_out is pushed above m_in by the larger std.
  q = energy.propose_margins(e_out, e_in)
  assert q["inverted"] and q["m_out"] > q["m_in"]
  np.testing.assert_allclose(q["m_out"] - q["m_in"], max(e_in.std(), e_out.std()))


# --- ODIN ---------------------------------------------------------------------------

W = RNG.normal(size=(12, 4))
B = RNG.normal(size=4)
X = RNG.uniform(0, 1, size=(16, 12))


def _np_odin(x, temperature, epsilon, std=1.0):
  """A numpy port of score_calculation.ODIN on a linear model f(x) = xW + b."""
  z = x @ W + B
  pred = z.argmax(1)
  zt = z / temperature
  p = np.exp(zt - zt.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = (p - np.eye(4)[pred]) @ W.T / temperature  # d CE(z/T, pred) / dx
  gradient = (grad >= 0).astype(np.float64)            # torch.ge(grad, 0)
  gradient = (gradient - 0.5) * 2 / std
  x_t = x - epsilon * gradient
  zt = (x_t @ W + B) / temperature
  q = np.exp(zt - zt.max(1, keepdims=True))
  return (q / q.sum(1, keepdims=True)).max(1)


@pytest.mark.parametrize("temperature, epsilon, std", [(1000.0, 0.0014, 1.0), (1.0, 0.01, 1.0),
                                                       (10.0, 0.002, 0.25)])
def test_odin_matches_a_numpy_port_of_the_reference(temperature, epsilon, std):
  with jax.enable_x64(True):
    logits_fn = lambda x: x @ jnp.asarray(W) + jnp.asarray(B)
    got = odin.odin_score(logits_fn, jnp.asarray(X), temperature=temperature, epsilon=epsilon,
                          std=std)
    np.testing.assert_allclose(np.asarray(got), _np_odin(X, temperature, epsilon, std),
                               rtol=1e-9)


def test_odin_raises_the_score_and_checks_options():
  logits_fn = lambda x: x @ jnp.asarray(W, jnp.float32) + jnp.asarray(B, jnp.float32)
  x = jnp.asarray(X, jnp.float32)
  base = odin.odin_score(logits_fn, x, temperature=10.0, epsilon=0.0)
  moved = odin.odin_score(logits_fn, x, temperature=10.0, epsilon=0.01)
  assert np.all(np.asarray(moved) >= np.asarray(base) - 1e-6)
  with pytest.raises(RegistryError, match="epsilon must be >= 0"):
    scores.build("odin(epsilon=-0.1)")
  with pytest.raises(RegistryError, match="temperature must be > 0"):
    scores.build("odin(temperature=0)")


# --- Mahalanobis --------------------------------------------------------------------

def _features(n=300, d=6, k=3, seed=1):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  means = rng.normal(0, 3, (k, d))
  a = rng.normal(size=(d, d))
  f = means[y] + rng.normal(size=(n, d)) @ a
  return f.astype(np.float32), y


def test_mahalanobis_fit_matches_the_reference_estimator():
  f, y = _features()
  stats = mahalanobis.fit(f, y, 3)
  f64 = f.astype(np.float64)
  means = np.stack([f64[y == c].mean(0) for c in range(3)])
  centred = f64 - means[y]
  ref = EmpiricalCovariance(assume_centered=False).fit(centred)
  np.testing.assert_allclose(stats["means"], means, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["precision"], ref.precision_, rtol=1e-4, atol=1e-5)
  # Score: max_c -1/2 (f - mu_c)^T P (f - mu_c), as get_Mahalanobis_score.
  diff = f64[:, None, :] - means[None]
  ref_score = (-0.5 * np.einsum("ncd,de,nce->nc", diff, ref.precision_, diff)).max(1)
  np.testing.assert_allclose(mahalanobis.score(jnp.asarray(f), stats), ref_score, rtol=1e-4,
                             atol=1e-3)


def test_mahalanobis_streaming_fit_equals_the_one_shot_fit():
  """Two passes of padded, masked batches (as the evaluator streams them):
  class sums, then the centred scatter."""
  f, y = _features(250)

  def stream(fn, args=None):
    total = {}
    for start in range(0, 250, 64):
      idx = np.arange(start, start + 64)
      mask = idx < 250
      idx = np.where(mask, idx, 0)
      out = {"features": jnp.asarray(f[idx]), "logits": jnp.zeros((64, 3))}
      for k, v in fn(out, jnp.asarray(y[idx]), jnp.asarray(mask), args).items():
        total[k] = total.get(k, 0) + np.asarray(v, np.float64)
    return total
  sums = stream(mahalanobis._sums)
  means = mahalanobis.class_means(sums["sums"], sums["counts"], "test").astype(np.float32)
  scatter = stream(mahalanobis._scatter, jnp.asarray(means))["scatter"]
  precision = mahalanobis.precision_of(scatter, 250, 0.0)
  one = mahalanobis.fit(f, y, 3)
  np.testing.assert_allclose(means, one["means"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(precision, one["precision"], rtol=1e-4, atol=1e-4)


def test_mahalanobis_degenerate_inputs_are_named_or_regularised():
  f, y = _features()
  with pytest.raises(RegistryError, match=r"classes \[3\] have none"):
    mahalanobis.fit(f, y, 4)
  singular = np.concatenate([f, f[:, :1]], 1)  # a duplicated feature: singular covariance
  stats = mahalanobis.fit(singular, y, 3)
  assert np.all(np.isfinite(stats["precision"]))
  assert np.all(np.isfinite(np.asarray(mahalanobis.score(jnp.asarray(singular), stats))))
  ridged = mahalanobis.fit(singular, y, 3, ridge=1e-3)
  assert np.all(np.isfinite(ridged["precision"]))
