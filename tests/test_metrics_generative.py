"""Generative precision/recall: known answers, the numpy references, masks, jit, errors."""

import jax
import numpy as np
import pytest
import reference_generative as ref

from jaxrobust.metrics import generative as gen

IMPROVED, PROBABILISTIC = gen.improved_precision_recall, gen.probabilistic_precision_recall
PAD, DIM, CHUNK = 36, 5, 16  # small cases are padded to PAD rows: each core compiles once


def _floats(pair):
  return tuple(float(v) for v in pair)


def _pad(x, rows, fill=np.nan):
  x = np.asarray(x, np.float32)
  mask = np.arange(rows) < len(x)
  return np.concatenate([x, np.full((rows - len(x), x.shape[1]), fill, np.float32)]), mask


def _case(rng):
  """Random real/fake sets: Gaussian, or a small integer lattice full of exact
  ties and duplicate rows (distances then exact in float32)."""
  n, m = (int(v) for v in rng.integers(6, PAD + 1, 2))
  if rng.random() < 0.4:
    lo = int(rng.integers(1, 3))
    return (rng.integers(-lo, lo + 1, (n, DIM)).astype(np.float32),
            rng.integers(-lo, lo + 1, (m, DIM)).astype(np.float32) + rng.integers(0, 2))
  real = rng.normal(size=(n, DIM)) * rng.uniform(0.5, 2.0)
  fake = rng.normal(size=(m, DIM)) * rng.uniform(0.5, 2.0) + rng.uniform(0, 1.5)
  return real.astype(np.float32), fake.astype(np.float32)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("chunk_size", [3, CHUNK])
def test_equals_the_numpy_references_on_random_padded_inputs(chunk_size):
  """Chunk sizes that divide neither set (3 is below k = 4); NaN padding."""
  rng = np.random.default_rng(chunk_size)
  for _ in range(8):
    real, fake = _case(rng)
    (pr, mr), (pf, mf) = _pad(real, PAD), _pad(fake, PAD)
    masks = {"real_mask": mr, "fake_mask": mf, "chunk_size": chunk_size}
    got = _floats(IMPROVED(pr, pf, **masks))
    want = ref.improved_precision_recall(real, fake, k=3)
    assert got == pytest.approx(want, abs=1e-7), (got, want, real, fake)
    got = _floats(PROBABILISTIC(pr, pf, **masks))
    want = ref.probabilistic_precision_recall(real, fake, a=1.2, k=4)
    assert got == pytest.approx(want, abs=2e-6), (got, want, real, fake)


def test_chunk_size_does_not_change_the_numbers():
  rng = np.random.default_rng(5)
  real, fake = _gaussian(rng, PAD, DIM), _gaussian(rng, PAD, DIM, shift=0.3)
  assert _floats(IMPROVED(real, fake, chunk_size=3)) == _floats(
      IMPROVED(real, fake, chunk_size=CHUNK))
  assert _floats(PROBABILISTIC(real, fake, chunk_size=3)) == pytest.approx(
      _floats(PROBABILISTIC(real, fake, chunk_size=CHUNK)), abs=1e-6)


@pytest.mark.slow
def test_options_k_and_a_follow_the_reference():
  rng = np.random.default_rng(1)
  real, fake = _gaussian(rng, PAD, DIM), _gaussian(rng, PAD, DIM, shift=0.5)
  assert _floats(IMPROVED(real, fake, k=5, chunk_size=CHUNK)) == pytest.approx(
      ref.improved_precision_recall(real, fake, k=5), abs=1e-7)
  for a, k in ((2.5, 2), (1.0, 4)):
    assert _floats(PROBABILISTIC(real, fake, a=a, k=k, chunk_size=CHUNK)) == pytest.approx(
        ref.probabilistic_precision_recall(real, fake, a=a, k=k), abs=2e-6)


@pytest.mark.slow
def test_translation_invariant_far_from_the_origin():
  """Both sets 1000 away from the origin (a feature mean like real embeddings'):
  the Gram expansion runs on translated features, so the numbers stay exact."""
  rng = np.random.default_rng(2)
  real, fake = _gaussian(rng, PAD, DIM), _gaussian(rng, PAD, DIM, shift=0.5)
  far_r, far_f = real + 1000, fake + 1000
  assert _floats(IMPROVED(far_r, far_f, chunk_size=CHUNK)) == pytest.approx(
      ref.improved_precision_recall(real, fake), abs=1e-7)
  assert _floats(PROBABILISTIC(far_r, far_f, chunk_size=CHUNK)) == pytest.approx(
      ref.probabilistic_precision_recall(real, fake), abs=1e-4)


# ----------------------------------------------------------------------------- masks


def test_padding_gives_the_unpadded_numbers():
  """Padding appended at the end: the same numbers to the bit. Masked rows
  anywhere (holding NaN and inf): the same up to float rounding."""
  rng = np.random.default_rng(3)
  real, fake = _case(rng)[0][:30], _gaussian(rng, 25, DIM)
  (pr, mr), (pf, mf) = _pad(real, PAD, fill=1e30), _pad(fake, PAD, fill=np.nan)
  scattered_r, scattered_f = np.zeros(PAD, bool), np.zeros(PAD, bool)
  scattered_r[np.sort(rng.choice(PAD, len(real), replace=False))] = True
  scattered_f[np.sort(rng.choice(PAD, len(fake), replace=False))] = True
  sr, sf = np.full((PAD, DIM), np.nan, np.float32), np.full((PAD, DIM), -np.inf, np.float32)
  sr[scattered_r], sf[scattered_f] = real, fake
  for fn in (IMPROVED, PROBABILISTIC):
    want = _floats(fn(real, fake, chunk_size=CHUNK))
    assert _floats(fn(pr, pf, real_mask=mr, fake_mask=mf, chunk_size=CHUNK)) == want, fn
    # 0/1 numeric masks are accepted as well.
    assert _floats(fn(pr, pf, real_mask=mr.astype(np.float32), fake_mask=mf.astype(np.int32),
                      chunk_size=CHUNK)) == want, fn
    got = _floats(fn(sr, sf, real_mask=scattered_r, fake_mask=scattered_f, chunk_size=CHUNK))
    assert got == pytest.approx(want, abs=1e-6), fn


# ----------------------------------------------------------------------------- known answers

N = 600  # samples per set in the synthetic cases (64-D: the paper's toy setting)


def _gaussian(rng, n=N, dim=64, shift=0.0):
  return (rng.normal(size=(n, dim)) + shift).astype(np.float32)


def _embed(x, dim=64):
  """Low-dimensional points as 64-D features (zero coordinates added)."""
  return np.pad(x, ((0, 0), (0, dim - x.shape[1])))


def test_identical_distributions_score_near_one():
  rng = np.random.default_rng(6)
  # k-NN balls (k = 3) of 600 samples cover a 64-D Gaussian poorly (~0.6):
  # improved precision/recall is near 1 on low-dimensional data.
  precision, recall = _floats(IMPROVED(_embed(_gaussian(rng, dim=2)),
                                       _embed(_gaussian(rng, dim=2))))
  assert precision > 0.95 and recall > 0.95
  p_precision, p_recall = _floats(PROBABILISTIC(_gaussian(rng), _gaussian(rng)))
  assert p_precision > 0.95 and p_recall > 0.95


def test_disjoint_supports_score_zero():
  rng = np.random.default_rng(7)
  real, fake = _gaussian(rng), _gaussian(rng, shift=10.0)
  assert _floats(IMPROVED(real, fake)) == (0.0, 0.0)
  assert _floats(PROBABILISTIC(real, fake)) == (0.0, 0.0)


def test_dropped_mode_lowers_recall_not_precision():
  """Real: 4 separated modes. Fake: 3 of them (same sample count) vs all 4."""
  rng = np.random.default_rng(8)
  centers = 30.0 * np.eye(4, 64)
  real = _gaussian(rng) + centers[np.arange(N) % 4]
  fake_all = _gaussian(rng) + centers[np.arange(N) % 4]
  fake_three = _gaussian(rng) + centers[np.arange(N) % 3]
  kept = np.arange(N) % 4 < 3
  for fn in (IMPROVED, PROBABILISTIC):
    precision_all, recall_all = _floats(fn(real, fake_all))
    precision, recall = _floats(fn(real, fake_three))
    # No real sample of the dropped mode is covered: recall is 3/4 of the
    # recall of the kept modes' real samples alone.
    _, recall_kept = _floats(fn(real, fake_three, real_mask=kept))
    assert recall == pytest.approx(0.75 * recall_kept, abs=1e-6), fn
    assert recall < 0.8 * recall_all, fn
    assert precision > 0.9 * precision_all, fn


def test_real_outlier_inflates_improved_precision_not_p_precision():
  """The authors' outlier test (toy_experiment.py ``outlier_f``): one real
  sample replaced by -2 + N(0, I), fake = N(-1.5, I). The outlier's k-NN ball
  is large enough to hold every fake sample."""
  rng = np.random.default_rng(9)
  real, fake = _gaussian(rng), _gaussian(rng, shift=-1.5)
  with_outlier = real.copy()
  with_outlier[0] = -2.0 + rng.normal(size=64)
  precision, _ = _floats(IMPROVED(real, fake))
  precision_outlier, _ = _floats(IMPROVED(with_outlier, fake))
  assert precision < 0.05 and precision_outlier > 0.9
  p_precision, _ = _floats(PROBABILISTIC(real, fake))
  p_precision_outlier, _ = _floats(PROBABILISTIC(with_outlier, fake))
  assert p_precision < 0.05 and p_precision_outlier < 0.05
  assert abs(p_precision_outlier - p_precision) < 0.03


def test_swapping_the_sets_swaps_precision_and_recall():
  rng = np.random.default_rng(10)
  real, fake = _gaussian(rng, PAD, DIM), _gaussian(rng, PAD, DIM, shift=0.6)
  for fn in (IMPROVED, PROBABILISTIC):
    p, r = _floats(fn(real, fake, chunk_size=CHUNK))
    assert _floats(fn(fake, real, chunk_size=CHUNK)) == pytest.approx((r, p), abs=1e-6)


# ----------------------------------------------------------------------------- jit, errors


def test_jit_and_nan_instead_of_wrong_numbers():
  rng = np.random.default_rng(11)
  real, fake = _gaussian(rng, PAD, DIM), _gaussian(rng, PAD, DIM, shift=0.4)
  mr, mf = np.ones(PAD, bool), np.arange(PAD) < 30
  jitted = {
      IMPROVED: jax.jit(lambda r, f, a, b: IMPROVED(r, f, real_mask=a, fake_mask=b,
                                                    chunk_size=CHUNK)),
      PROBABILISTIC: jax.jit(lambda r, f, a, b, scale=1.2: PROBABILISTIC(
          r, f, a=scale, real_mask=a, fake_mask=b, chunk_size=CHUNK)),
  }
  for fn, jfn in jitted.items():
    eager = _floats(fn(real, fake, real_mask=mr, fake_mask=mf, chunk_size=CHUNK))
    assert _floats(jfn(real, fake, mr, mf)) == pytest.approx(eager, abs=1e-7)
    bad = real.copy()
    bad[3, 1] = np.nan
    assert np.all(np.isnan(_floats(jfn(bad, fake, mr, mf))))
    few = np.arange(PAD) < (3 if fn is IMPROVED else 4)  # k valid rows: too few
    assert np.all(np.isnan(_floats(jfn(real, fake, mr, few))))
    masked_nan = fake.copy()
    masked_nan[~mf] = np.nan  # NaN only in masked rows: fine
    assert _floats(jfn(real, masked_nan, mr, mf)) == pytest.approx(eager, abs=1e-7)
  # The radius scale is traced: a bad value gives NaN, another value no recompile.
  p_jit = jitted[PROBABILISTIC]
  assert np.all(np.isnan(_floats(p_jit(real, fake, mr, mf, -1.0))))
  assert _floats(p_jit(real, fake, mr, mf, 2.0)) == pytest.approx(_floats(
      PROBABILISTIC(real, fake, a=2.0, real_mask=mr, fake_mask=mf, chunk_size=CHUNK)), abs=1e-7)


@pytest.mark.parametrize("fn", [IMPROVED, PROBABILISTIC])
def test_bad_input_raises_naming_the_argument(fn):
  rng = np.random.default_rng(12)
  real = rng.normal(size=(10, DIM)).astype(np.float32)
  fake = rng.normal(size=(8, DIM)).astype(np.float32)
  cases = [
      ({"real": real[0]}, "real must be 2-D"),
      ({"fake": fake[None]}, "fake must be 2-D"),
      ({"real": real[:0]}, "real must be 2-D"),
      ({"fake": fake[:, :3]}, "fake has 3 features per row but real has 5"),
      ({"fake_mask": np.arange(8) < 3}, "fake has 3 valid row"),
      ({"real": real[:3]}, "real has 3 valid row"),
      ({"real_mask": np.ones(9, bool)}, "real_mask has shape"),
      ({"k": 0}, "k must be a positive integer"),
      ({"k": 2.0}, "k must be a positive integer"),
      ({"chunk_size": 0}, "chunk_size must be a positive integer"),
  ]
  nan_real = real.copy()
  nan_real[2, 0] = np.nan
  cases.append(({"real": nan_real}, "real contains 1 NaN or inf"))
  inf_fake = fake.copy()
  inf_fake[1, 1] = np.inf
  cases.append(({"fake": inf_fake}, "fake contains 1 NaN or inf"))
  if fn is PROBABILISTIC:
    cases += [({"a": 0.0}, "a must be a finite number > 0"),
              ({"a": float("nan")}, "a must be a finite number > 0"),
              ({"a": True}, "a must be a finite number > 0")]
  for change, message in cases:
    kwargs = {"real": real, "fake": fake, **change}
    with pytest.raises(ValueError, match=message):
      fn(kwargs.pop("real"), kwargs.pop("fake"), **kwargs)
