"""A numpy/scikit-learn port of DFR's reference protocol, for the tests.

Ported from ``PolinaKirichenko/deep_feature_reweighting``,
``dfr_evaluate_spurious.py``: ``dfr_on_validation_tune`` /
``dfr_on_validation_eval`` (with the script's defaults ``balance_val=True``,
``add_train=False``, ``num_retrains=1`` while tuning) and
``dfr_train_subset_tune`` / ``dfr_train_subset_eval``. Only the random draws
differ: instead of ``np.random.shuffle`` on the global state the subsets come
from a :class:`jaxrobust.methods.dfr.TrValPlan` / ``TrTrPlan``, so both sides
fit identical subsets. The classifier is liblinear, as the reference (with a
fixed ``random_state`` for liblinear's coordinate order).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

C_OPTIONS = [1., 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]
CLASS_WEIGHT_OPTIONS = [1., 2., 3., 10., 100., 300., 1000.]
CLASS_WEIGHT_DICTS = ([{0: 1, 1: w} for w in CLASS_WEIGHT_OPTIONS]
                      + [{0: w, 1: 1} for w in CLASS_WEIGHT_OPTIONS])


def liblinear(c, class_weight=None, **kwargs):
  return LogisticRegression(penalty="l1", C=c, solver="liblinear", class_weight=class_weight,
                            random_state=0, **kwargs)


def fit(model, x, y, sample_weight=None):
  with warnings.catch_warnings():  # penalty='l1' is deprecated in favour of l1_ratio since 1.8
    warnings.simplefilter("ignore")
    return model.fit(x, y, sample_weight=sample_weight)


def group_accs(pred, y, g, n_groups):
  return np.array([(pred == y)[g == k].mean() for k in range(n_groups)])


def dfr_on_validation_tune(x_val, y_val, g_val, plan):
  x_fit, y_fit = x_val[plan.tune_fit], y_val[plan.tune_fit]
  x_score, y_score, g_score = x_val[plan.tune_score], y_val[plan.tune_score], g_val[plan.tune_score]
  n_groups = np.max(g_val[plan.tune_fit]) + 1
  scaler = StandardScaler()
  x_fit = scaler.fit_transform(x_fit)
  x_score = scaler.transform(x_score)
  worst_accs = {}
  for c in C_OPTIONS:
    for class_weight in [{0: 1., 1: 1.}]:
      model = fit(liblinear(c, class_weight), x_fit, y_fit)
      worst_accs[c, class_weight[0], class_weight[1]] = np.min(
          group_accs(model.predict(x_score), y_score, g_score, n_groups))
  keys, values = list(worst_accs.keys()), list(worst_accs.values())
  return keys[np.argmax(values)], worst_accs


def dfr_on_validation_eval(c, w1, w2, x_val, y_val, x_train, plan):
  scaler = StandardScaler().fit(x_train)
  coefs, intercepts = [], []
  for idx in plan.final:
    model = fit(liblinear(c, {0: w1, 1: w2}), scaler.transform(x_val[idx]), y_val[idx])
    coefs.append(model.coef_)
    intercepts.append(model.intercept_)
  return np.mean(coefs, axis=0)[0], float(np.mean(intercepts, axis=0)[0]), scaler


def dfr_train_subset_tune(x_train, y_train, g_train, x_val, y_val, g_val, plan,
                          learn_class_weights=True):
  scaler = StandardScaler().fit(x_train)
  n_groups = np.max(g_train) + 1
  x_fit, y_fit = scaler.transform(x_train[plan.tune]), y_train[plan.tune]
  x_score = scaler.transform(x_val)
  options = CLASS_WEIGHT_DICTS if learn_class_weights else [{0: 1., 1: 1.}]
  worst_accs = {}
  for c in C_OPTIONS:
    for class_weight in options:
      model = fit(liblinear(c, class_weight, max_iter=20), x_fit, y_fit)
      worst_accs[c, class_weight[0], class_weight[1]] = np.min(
          group_accs(model.predict(x_score), y_val, g_val, n_groups))
  keys, values = list(worst_accs.keys()), list(worst_accs.values())
  return keys[np.argmax(values)], worst_accs


def dfr_train_subset_eval(c, w1, w2, x_train, y_train, plan):
  scaler = StandardScaler().fit(x_train)
  coefs, intercepts = [], []
  for idx in plan.final:
    model = fit(liblinear(c, {0: w1, 1: w2}), scaler.transform(x_train[idx]), y_train[idx])
    coefs.append(model.coef_)
    intercepts.append(model.intercept_)
  return np.mean(coefs, axis=0)[0], float(np.mean(intercepts, axis=0)[0]), scaler
