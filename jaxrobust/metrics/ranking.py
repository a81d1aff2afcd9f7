"""Exact sort/rank/count machinery behind the OOD metrics (internal module).

Every OOD metric is a function of a handful of integer counts per example:
how many scores of its own side and of the other side are strictly below or
at most equal to it. This module computes them exactly, with static shapes,
and without x64:

* Scores become **integer sort keys** (:func:`score_keys`): the float bits
  reinterpreted so that integer order equals float order (``-0.0`` is folded
  into ``+0.0``). XLA sorts one integer operand several times faster than
  floats or (key, payload) pairs on CPU, and keys make "1 ulp apart" exact.
* Each side is sorted **separately** (two small single-operand sorts), the
  smaller side is binary-searched in the larger one, and the larger side's
  counts come from a histogram of those search results (a scatter-add and a
  cumulative sum) instead of a second search: "sort less, merge, count".
* Counts stay ``int32`` (exact up to 2**30 examples per side); float sums of
  per-example terms use a compensated sum (:func:`accurate_sum`), so the
  relative error stays ~1e-7 at 1e8 examples.

Masked-out entries get the key :func:`invalid_key` (the key type's largest
integer), which sorts after every finite score and never equals one.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Array = jax.Array

MAX_PER_SIDE = 2**30
"""Largest supported number of entries per side (int32 counts, sums of two)."""


# ----------------------------------------------------------------------------
# Keys and sums.
# ----------------------------------------------------------------------------


def key_dtype(dtype) -> np.dtype:
  return np.dtype(np.int64) if np.dtype(dtype).itemsize == 8 else np.dtype(np.int32)


def invalid_key(dtype) -> int:
  """The key of masked-out entries: the largest integer of the key type."""
  return int(np.iinfo(key_dtype(dtype)).max)


def as_float(x: Array) -> Array:
  """Float32 (or float64 if given) copy; float16/bfloat16 upcast exactly."""
  if x.dtype == jnp.float64:
    return x
  return x.astype(jnp.float32)


def replicated(x: Array) -> Array:
  """Un-shards an array whose type carries an explicit sharding.

  Arrays sharded over a mesh with Explicit axes (the ``jax.make_mesh``
  default) must be replicated before they are sorted; Auto-sharded and
  unsharded arrays pass through (XLA then inserts the gather itself).
  """
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or all(a is None for a in sharding.spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.P()))


def score_keys(x: Array, mask: Array) -> Array:
  """Order-preserving integer keys of float scores; masked entries -> INVALID.

  For IEEE floats, the bit pattern read as a signed integer is monotone for
  non-negative values and reversed for negative ones; flipping the magnitude
  bits of negatives makes the whole map monotone. ``-0.0`` is mapped to
  ``+0.0`` first because the two compare equal as floats.
  """
  x = as_float(x)
  kd = key_dtype(x.dtype)
  x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
  bits = lax.bitcast_convert_type(x, kd)
  magnitude = np.array(np.iinfo(kd).max, kd)
  keys = jnp.where(bits < 0, bits ^ magnitude, bits)
  return jnp.where(mask, keys, np.array(invalid_key(x.dtype), kd))


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
  """Knuth's error-free sum: a + b == s + e exactly."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


_LANES = 32


def accurate_sum(x: Array) -> Array:
  """Sum of a float32 vector with ~1 ulp error whatever its length.

  Compensated (Ogita-Rump-Oishi Sum2) accumulation over ``_LANES`` strided
  lanes, then a pairwise double-float reduction of the lanes. A plain float32
  reduction can lose ~n*eps in the worst case (its order is backend-defined).
  """
  n = x.shape[0]
  m = -(-n // _LANES)
  x = jnp.pad(x, (0, m * _LANES - n)).reshape(_LANES, m)
  hi, lo = x[0], jnp.zeros_like(x[0])
  for j in range(1, _LANES):
    hi, e = two_sum(hi, x[j])
    lo = lo + e
  while hi.shape[0] > 1:
    if hi.shape[0] % 2:
      hi, lo = jnp.pad(hi, (0, 1)), jnp.pad(lo, (0, 1))
    hi, e = two_sum(hi[0::2], hi[1::2])
    lo = lo[0::2] + lo[1::2] + e
  return hi[0] + lo[0]


def masked_count(cond: Array) -> Array:
  return jnp.sum(cond, dtype=jnp.int32)


def ratio(num: Array, den: Array) -> Array:
  """num / den in float32 with 0/0 -> 0 (counts as int32 inputs)."""
  den_f = den.astype(jnp.float32)
  return jnp.where(den > 0, num.astype(jnp.float32) / jnp.where(den > 0, den_f, 1), 0.0)


# ----------------------------------------------------------------------------
# Sorted sides and their counts.
# ----------------------------------------------------------------------------


class Side(NamedTuple):
  """One side (in- or out-distribution), sorted ascending by raw score.

  Index ``i < n`` is the i-th smallest valid score; entries ``i >= n`` are
  padding. For each sorted entry with key ``s``:
  ``self_lt = #{own < s}``, ``self_le = #{own <= s}``,
  ``other_lt = #{other side < s}``, ``other_le = #{other side <= s}``.
  """
  keys: Array
  valid: Array
  n: Array
  self_lt: Array
  self_le: Array
  other_lt: Array
  other_le: Array


def sort_keys(keys: Array) -> Array:
  return lax.sort(keys, is_stable=False)


def run_bounds(sorted_keys: Array) -> tuple[Array, Array]:
  """(#{< s_i}, #{<= s_i}) for each entry of an ascending array."""
  size = sorted_keys.shape[0]
  idx = jnp.arange(size, dtype=jnp.int32)
  change = sorted_keys[1:] != sorted_keys[:-1]
  first = jnp.concatenate([jnp.ones((1,), bool), change])
  last = jnp.concatenate([change, jnp.ones((1,), bool)])
  # associative_scan beats lax.cummax/cummin (reduce_window) on CPU.
  lt = lax.associative_scan(jnp.maximum, jnp.where(first, idx, 0))
  le = lax.associative_scan(jnp.minimum, jnp.where(last, idx + 1, size), reverse=True)
  return lt, le


_BLOCK = 256


def search_counts(sorted_keys: Array, sorted_le: Array, queries: Array,
                  queries_sorted: bool = False) -> tuple[Array, Array]:
  """(#{sorted < q}, #{sorted <= q}) per query: one binary search + a gather."""
  if queries_sorted and queries.shape[0] > 4 * _BLOCK:
    lt = _windowed_lt(sorted_keys, queries, _BLOCK)
  else:
    lt = jnp.searchsorted(sorted_keys, queries, side="left",
                          method="scan_unrolled").astype(jnp.int32)
  at = jnp.minimum(lt, sorted_keys.shape[0] - 1)
  le = jnp.where(sorted_keys[at] == queries, sorted_le[at], lt)
  return lt, le


def _windowed_lt(sorted_keys: Array, queries: Array, block: int) -> Array:
  """#{sorted < q} for *ascending* queries: bound each block of queries by
  full searches of its first and last element, then bisect only inside
  that window (log2 of the widest window steps instead of log2 n)."""
  nq = queries.shape[0]
  nb = -(-nq // block)
  q = jnp.pad(queries, (0, nb * block - nq), mode="edge").reshape(nb, block)
  ends = jnp.searchsorted(sorted_keys, jnp.stack([q[:, 0], q[:, -1]]), side="left",
                          method="scan_unrolled").astype(jnp.int32)
  lo = jnp.broadcast_to(ends[0][:, None], q.shape)
  hi = jnp.broadcast_to(ends[1][:, None], q.shape)
  steps = 32 - lax.clz(jnp.max(ends[1] - ends[0]))

  def body(_, carry):
    lo, hi = carry
    mid = (lo + hi) // 2
    active = lo < hi
    right = sorted_keys[mid] < q
    return jnp.where(active & right, mid + 1, lo), jnp.where(active & ~right, mid, hi)

  lo, _ = lax.fori_loop(0, steps, body, (lo, hi))
  return lo.reshape(-1)[:nq]


def partner_counts(lt: Array, le: Array, weight: Array, size: int
                   ) -> tuple[Array, Array]:
  """Counts for the searched side from the query side's search results.

  If ``lt/le`` hold, for each query q, ``#{s < q}`` and ``#{s <= q}`` in an
  ascending array s, then ``#{q < s_j} = #{q : le(q) <= j}`` and
  ``#{q <= s_j} = #{q : lt(q) <= j}``: two histograms and prefix sums.
  """
  def prefix_hist(idx):
    hist = jnp.zeros((size + 1,), jnp.int32).at[idx].add(weight, mode="drop")
    return jnp.cumsum(hist)[:size]
  return prefix_hist(le), prefix_hist(lt)


def rank_sides(in_keys: Array, out_keys: Array) -> tuple[Side, Side]:
  """Sorts both sides and computes all per-entry counts.

  The smaller side is searched in the larger one (fewer binary searches);
  the larger side gets its counts from :func:`partner_counts`. Under ``jit``
  XLA drops whatever a metric does not use.
  """
  inv = invalid_key(in_keys.dtype)
  sides = []
  for keys in (in_keys, out_keys):
    s = sort_keys(keys)
    n = masked_count(keys != inv)
    valid = jnp.arange(s.shape[0]) < n
    lt, le = run_bounds(s)
    sides.append((s, valid, n, lt, le))
  small, big = (0, 1) if in_keys.shape[0] <= out_keys.shape[0] else (1, 0)
  s_q, v_q = sides[small][0], sides[small][1]
  s_b, _, _, _, le_b = sides[big]
  q_lt, q_le = search_counts(s_b, le_b, s_q, queries_sorted=True)
  b_lt, b_le = partner_counts(q_lt, q_le, v_q.astype(jnp.int32), s_b.shape[0])
  other = {small: (q_lt, q_le), big: (b_lt, b_le)}
  return tuple(Side(*sides[i], *other[i]) for i in (0, 1))


# ----------------------------------------------------------------------------
# Order statistics without sorting.
# ----------------------------------------------------------------------------


def to_unsigned(keys: Array) -> Array:
  """Signed keys -> unsigned keys with the same order."""
  kd = np.dtype(keys.dtype)
  ud = np.dtype(f"uint{kd.itemsize * 8}")
  return lax.bitcast_convert_type(keys, ud) ^ np.array(1 << (kd.itemsize * 8 - 1), ud)


def masked_max(ukeys: Array, cond: Array) -> Array:
  """Largest unsigned key where cond holds (0 if none)."""
  return jnp.max(jnp.where(cond, ukeys, jnp.zeros((), ukeys.dtype)))


def kth_largest(ukeys: Array, valid: Array, k: Array) -> Array:
  """The k-th largest valid unsigned key (1-based), by bisection on its bits.

  Builds the answer from the most significant bit down, keeping a bit when
  at least k valid keys are >= the candidate: one counting pass per bit (32
  for float32 scores), no sort. Cheap on every backend.
  """
  bits = ukeys.dtype.itemsize * 8

  def body(i, acc):
    cand = acc | (jnp.ones((), ukeys.dtype) << (bits - 1 - i).astype(ukeys.dtype))
    enough = masked_count(valid & (ukeys >= cand)) >= k
    return jnp.where(enough, cand, acc)

  return lax.fori_loop(0, bits, body, jnp.zeros((), ukeys.dtype))


# ----------------------------------------------------------------------------
# Threshold selection at a target rate (exact rational arithmetic).
# ----------------------------------------------------------------------------


class Rate(NamedTuple):
  """A target rate such as 0.95, held as an exact fraction p/q (static)."""
  value: float
  p: int
  q: int


def as_rate(name: str, value: float) -> Rate:
  value = float(value)
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{name} must lie in (0, 1], got {value}.")
  frac = Fraction(value).limit_denominator(10_000)
  if float(frac) != value:
    raise ValueError(
        f"{name}={value!r} is not a fraction p/q with q <= 10000; exact "
        "threshold selection needs a rate like 0.95, 0.9999 or 1/3.")
  return Rate(value, frac.numerator, frac.denominator)


def scaled_rate(n: Array, rate: Rate) -> tuple[Array, Array]:
  """(floor, remainder) of n * p / q, i.e. n*p == q*floor + remainder.

  Written as ``p*(n//q) + (p*(n%q))//q`` so that int32 never overflows.
  """
  a, b = n // rate.q, n % rate.q
  return rate.p * a + (rate.p * b) // rate.q, (rate.p * b) % rate.q


def _f64_rounding(k: Array, n: Array) -> tuple[Array, Array]:
  """Rounding error of float64(k / n), for 1/4 <= k/n <= 1, in exact units.

  Returns ``(rho, shift)`` with ``float64(k/n) - k/n == rho / (n * 2**(52 +
  shift))`` and shift in {1, 2} (the binade of k/n). Long division by
  repeated doubling; k == n gives rho == 0.
  """
  shift = jnp.where(2 * k >= n, 1, 2)
  steps = 52 + shift

  def body(i, carry):
    r, bit = carry
    r2 = 2 * r
    b = r2 >= n
    active = i < steps
    return jnp.where(active, r2 - jnp.where(b, n, 0), r), jnp.where(active, b, bit)

  r, lsb = lax.fori_loop(0, 54, body, (k % n, jnp.zeros_like(k, dtype=bool)))
  up = (2 * r > n) | ((2 * r == n) & lsb)
  rho = jnp.where(up, n - r, -r)
  return jnp.where(k >= n, 0, rho), shift


def nearest_picks_upper(k_lo: Array, k_hi: Array, n: Array, rate: Rate) -> Array:
  """Whether ``argmin |k/n - rate|`` over {k_lo, k_hi} picks k_hi.

  Reproduces the reference codes' float64 ``np.abs(recall - 0.95).argmin()``
  where the upper candidate comes first in their array: an exact tie in
  distance goes to whichever float64 distance is smaller, and to k_hi if the
  float64 distances are equal. Outside exact ties, float64 agrees with exact
  rational arithmetic (distances differ by >= 1/(q*n) >> 1e-16). The float64
  tie emulation assumes both float64 subtractions are exact (Sterbenz' lemma,
  guaranteed for rate >= 2/3; checked against numpy for rate >= 0.6 and all
  n < 400); below rate 0.5 exact ties go to k_hi.
  """
  fl, rem = scaled_rate(n, rate)
  # sign of 2*T - (k_lo + k_hi) with T = fl + rem/q, without overflow.
  gap = jnp.clip(2 * fl - (k_lo + k_hi), -2, 2) * rate.q + 2 * rem
  if rate.value < 0.5:
    return gap >= 0
  # Exact tie: pick k_lo iff float64(k_lo/n) + float64(k_hi/n) > 2*float64(rate).
  eps = Fraction(rate.value) - Fraction(rate.p, rate.q)
  c = 2 * eps * 2**54  # compare against e_lo + e_hi in units 1/(n 2**54)
  cn, cd = c.numerator, c.denominator
  u, w = n // cd, n % cd
  floor_cn = cn * u + (cn * w) // cd
  ks = jnp.stack([k_lo, k_hi])
  n_safe = jnp.broadcast_to(jnp.maximum(n, 1), ks.shape)
  rho, shift = _f64_rounding(jnp.clip(ks, 1, n_safe), n_safe)
  rho = jnp.where(ks >= 1, rho * jnp.where(shift == 1, 2, 1), 0)
  lower_closer = rho[0] + rho[1] > floor_cn
  return jnp.where(gap == 0, ~lower_closer, gap > 0)
