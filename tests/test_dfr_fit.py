"""DFR's numerical core (jaxrobust.methods.dfr) against scikit-learn's
liblinear and a port of the reference protocol (tests/reference_dfr.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_dfr as ref
from jaxrobust.methods import dfr


def sparse_features(n, d, seed, informative=0.2):
  """Non-negative, sparse-ish features (ReLU of Gaussians with varied scales),
  labels from a sparse linear rule plus noise."""
  rng = np.random.default_rng(seed)
  x = np.maximum(rng.normal(size=(n, d)), 0) * rng.gamma(2.0, 0.5, size=d)
  w = rng.normal(size=d) * (rng.random(d) < informative)
  s = x @ w + rng.normal(size=n) * 0.5 * np.std(x @ w)
  y = (s > np.median(s)).astype(np.int64)
  return x.astype(np.float32), y


def liblinear(x, y, c, sample_weight=None):
  """scikit-learn's liblinear, converged tightly, in float64."""
  model = ref.fit(ref.liblinear(c, tol=1e-8, max_iter=10_000), x.astype(np.float64), y,
                  sample_weight=sample_weight)
  return model.coef_[0], model.intercept_[0]


CASES = [  # n, d, C, masked, weighted
    (160, 12, 1.0, False, False),
    (160, 12, 0.05, True, True),
    (60, 200, 1.0, False, False),   # D > N
    (60, 200, 0.3, True, True),     # D > N, masked rows and sample weights
]


@pytest.mark.parametrize("n,d,c,masked,weighted", CASES)
def test_matches_liblinear_objective_and_predictions(n, d, c, masked, weighted):
  x, y = sparse_features(n, d, seed=n + d)
  x = (x - x.mean(0)) / x.std(0)
  rng = np.random.default_rng(1)
  mask = rng.random(n) < 0.8 if masked else np.ones(n, bool)
  sw = np.where(y == 1, 3.0, 1.0) * rng.uniform(0.5, 1.5, n) if weighted else np.ones(n)
  coef, intercept = dfr.logistic_regression_l1(
      x, y, C=c, mask=mask if masked else None, sample_weight=sw if weighted else None)
  sk_coef, sk_intercept = liblinear(x[mask], y[mask], c, sw[mask] if weighted else None)
  kw = dict(C=c, mask=mask, sample_weight=sw)
  ours = float(dfr.l1_logistic_objective(coef, intercept, x, y, **kw))
  theirs = float(dfr.l1_logistic_objective(sk_coef, sk_intercept, x, y, **kw))
  assert ours <= theirs * (1 + 1e-3)
  assert abs(float(intercept)) > 0 or abs(sk_intercept) < 1e-3  # the intercept is fitted
  agree = np.mean(dfr.predict(coef, intercept, x) == (x @ sk_coef + sk_intercept > 0))
  assert agree >= 0.99


def test_objective_penalises_the_intercept_as_liblinear():
  x, y = sparse_features(100, 5, seed=3)
  coef, b = np.zeros(5), 2.0
  z = x @ coef + b
  expected = abs(b) + 0.5 * np.sum(np.logaddexp(0, -(2 * y - 1) * z))
  got = float(dfr.l1_logistic_objective(coef, b, x, y, C=0.5))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.slow
def test_batched_fits_equal_single_fits():
  x, y = sparse_features(80, 30, seed=5)
  x = (x - x.mean(0)) / x.std(0)
  cs = np.array([1.0, 0.1, 0.01])
  masks = np.random.default_rng(2).random((3, 80)) < 0.7
  coef_b, b_b = dfr.fit_many(x, y, C=cs, masks=masks)
  coef_v, b_v = jax.vmap(lambda c, m: dfr.logistic_regression_l1(x, y, C=c, mask=m))(
      jnp.asarray(cs), jnp.asarray(masks))
  for i, c in enumerate(cs):
    coef_1, b_1 = dfr.logistic_regression_l1(x, y, C=c, mask=masks[i])
    np.testing.assert_allclose(coef_b[i], coef_1, atol=2e-3)
    np.testing.assert_allclose(b_b[i], b_1, atol=2e-3)
    np.testing.assert_allclose(coef_v[i], coef_1, atol=2e-3)
  assert not np.allclose(coef_b[0], coef_b[1], atol=1e-2)  # the C values do differ
  # a masked fit is the fit on the kept rows
  coef_sub, b_sub = dfr.logistic_regression_l1(x[masks[1]], y[masks[1]], C=cs[1])
  np.testing.assert_allclose(coef_b[1], coef_sub, atol=2e-3)


def test_standardize_matches_standard_scaler():
  from sklearn.preprocessing import StandardScaler
  x, _ = sparse_features(50, 6, seed=7)
  x[:, 2] = 4.0  # a constant feature gets scale 1
  mask = np.arange(50) < 30
  mean, scale = dfr.standardize_fit(x, mask)
  sk = StandardScaler().fit(x[mask])
  np.testing.assert_allclose(mean, sk.mean_, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scale, sk.scale_, rtol=1e-5)
  assert float(scale[2]) == 1.0


def groups_data(n, seed, majority=0.9, d=24):
  """y ∈ {0,1}, spurious a ∈ {0,1}, group g = 2y + a; a agrees with y with
  probability ``majority``. Features: weak core signal, strong spurious one,
  noise, ReLU'd (non-negative)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  a = np.where(rng.random(n) < majority, y, 1 - y)
  x = rng.normal(size=(n, d))
  x[:, :4] += 1.0 * (2 * y[:, None] - 1)
  x[:, 4:8] += 2.5 * (2 * a[:, None] - 1)
  x = np.maximum(x + 1.0, 0) * np.linspace(0.5, 2.0, d)
  return x.astype(np.float32), y, 2 * y + a


def test_dfr_tr_val_matches_reference_port():
  x_tr, y_tr, _ = groups_data(600, seed=10)
  x_val, y_val, g_val = groups_data(400, seed=11, majority=0.5)
  x_te, y_te, g_te = groups_data(400, seed=12, majority=0.5)
  plan = dfr.tr_val_plan(g_val, seed=3)
  assert len(plan.tune_fit) % 4 == 0 and np.all(np.bincount(g_val[plan.tune_fit]) ==
                                                len(plan.tune_fit) // 4)
  assert set(plan.tune_fit).isdisjoint(plan.tune_score)
  assert plan.final.shape[0] == 20
  out = dfr.dfr_tr_val(x_val, y_val, g_val, x_train=x_tr, plan=plan)
  (c, w1, w2), scores = ref.dfr_on_validation_tune(x_val, y_val, g_val, plan)
  assert out.c == c and out.class_weight == (w1, w2)
  np.testing.assert_allclose(out.tuning_worst_group_accuracy, list(scores.values()), atol=1e-9)
  coef, intercept, scaler = ref.dfr_on_validation_eval(c, w1, w2, x_val, y_val, x_tr, plan)
  np.testing.assert_allclose(out.mean, scaler.mean_, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.coef, coef, atol=2e-2 * np.abs(coef).max())
  x_std = scaler.transform(x_te)
  agree = np.mean(dfr.predict(out.coef, out.intercept, x_std) == (x_std @ coef + intercept > 0))
  assert agree >= 0.99
  # better worst group than an unbalanced ERM-like rule on the spurious feature
  wga = dfr.worst_group_accuracy(dfr.predict(out.coef, out.intercept, x_std), y_te, g_te,
                                 num_groups=4)
  assert wga > 0.6


@pytest.mark.slow
def test_dfr_tr_tr_matches_reference_port():
  x_tr, y_tr, g_tr = groups_data(800, seed=20, majority=0.85)
  x_val, y_val, g_val = groups_data(300, seed=21, majority=0.5)
  plan = dfr.tr_tr_plan(g_tr, seed=4)
  out = dfr.dfr_tr_tr(x_tr, y_tr, g_tr, x_val, y_val, g_val, plan=plan)
  assert len(out.candidates) == 7 * 13 and out.candidates[:2] == ((1.0, 1.0, 1.0), (1.0, 1.0, 2.0))
  (c, w1, w2), scores = ref.dfr_train_subset_tune(x_tr, y_tr, g_tr, x_val, y_val, g_val, plan)
  assert list(scores.keys()) == [tuple(k) for k in out.candidates]
  assert (out.c, *out.class_weight) == (c, w1, w2)
  coef, intercept, scaler = ref.dfr_train_subset_eval(c, w1, w2, x_tr, y_tr, plan)
  x_std = scaler.transform(x_val)
  agree = np.mean(dfr.predict(out.coef, out.intercept, x_std) == (x_std @ coef + intercept > 0))
  assert agree >= 0.99


def test_ties_pick_the_first_candidate():
  assert dfr._choose([0.5, 0.7, 0.7, 0.1]) == 1


def test_fold_into_head_equals_standardised_model():
  x, _ = sparse_features(40, 7, seed=30)
  rng = np.random.default_rng(0)
  coef, intercept = rng.normal(size=7), 0.3
  mean, scale = dfr.standardize_fit(x[:30])
  kernel, bias = dfr.fold_into_head(coef, intercept, mean, scale)
  assert kernel.shape == (7, 2) and bias.shape == (2,)
  logits = x @ kernel + bias
  z = np.asarray(dfr.standardize(x, mean, scale)) @ coef + intercept
  np.testing.assert_allclose(logits[:, 0], 0.0)
  np.testing.assert_allclose(logits[:, 1], z, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(logits.argmax(1), (z > 0).astype(int))
  coef3 = rng.normal(size=(3, 7))
  kernel3, bias3 = dfr.fold_into_head(coef3, np.zeros(3), mean, scale, num_classes=3)
  np.testing.assert_allclose(x @ kernel3 + bias3,
                             np.asarray(dfr.standardize(x, mean, scale)) @ coef3.T, rtol=1e-4,
                             atol=1e-4)


def test_bad_inputs():
  x, y = sparse_features(20, 3, seed=40)
  with pytest.raises(ValueError, match="C must"):
    dfr.logistic_regression_l1(x, y, C=0.0)
  with pytest.raises(ValueError, match="C must"):
    dfr.fit_many(x, y, C=[1.0, -0.1])
  with pytest.raises(ValueError, match="y must be binary"):
    dfr.logistic_regression_l1(x, np.arange(20) % 3, C=1.0)
  with pytest.raises(ValueError, match="max_iter"):
    dfr.logistic_regression_l1(x, y, C=1.0, max_iter=0)
  with pytest.raises(ValueError, match="mask keeps no example"):
    dfr.fit_many(x, y, C=[1.0, 1.0], masks=np.stack([np.ones(20, bool), np.zeros(20, bool)]))
  g = np.zeros(20, int)
  g[:10] = 1
  with pytest.raises(ValueError, match=r"groups \[2\] have no examples"):
    dfr.tr_tr_plan(g, num_groups=3)
  with pytest.raises(ValueError, match="DFR\\^Tr_Val validation set|tuning fitting half"):
    dfr.dfr_tr_val(x, y, g, x_train=x, num_groups=3)
  with pytest.raises(ValueError, match="y must be binary"):
    dfr.dfr_tr_tr(x, y + 1, g, x, y, g)
  with pytest.raises(ValueError, match="c_grid"):
    dfr.dfr_tr_val(x, y, g, x_train=x, c_grid=(1.0, 0.0))


def test_unconverged_fits_warn():
  x_tr, _, _ = groups_data(600, seed=10)  # the shapes of the DFR^Tr_Val test: no new compilation
  x_val, y_val, g_val = groups_data(400, seed=11, majority=0.5)
  with pytest.warns(RuntimeWarning, match="max_iter=10"):
    dfr.dfr_tr_val(x_val, y_val, g_val, x_train=x_tr, max_iter=10)
