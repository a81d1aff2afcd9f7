"""FGSM against a closed-form gradient, the ε-ball and [0, 1] box, and the
registered perturbation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import attacks
from jaxrobust.registry import RegistryError

RNG = np.random.default_rng(0)
W = RNG.normal(size=(12, 4)).astype(np.float64)
B = RNG.normal(size=4)
X = RNG.uniform(0, 1, size=(16, 12))
Y = RNG.integers(0, 4, 16)


def _np_fgsm(x, y, eps):
  """FGSM on a linear softmax model: d CE / d x = W (softmax(xW + b) - onehot(y))."""
  z = x @ W + B
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = (p - np.eye(4)[y]) @ W.T
  return np.clip(x + eps * np.sign(grad), 0, 1)


def _loss(x, y):
  logits = x @ jnp.asarray(W) + jnp.asarray(B)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def test_fgsm_matches_the_closed_form_gradient():
  with jax.enable_x64(True):
    out = attacks.fgsm(_loss, jnp.asarray(X), jnp.asarray(Y), eps=0.03)
    np.testing.assert_allclose(np.asarray(out), _np_fgsm(X, Y, 0.03), atol=1e-6)


def test_fgsm_stays_in_the_eps_ball_and_the_box():
  out = np.asarray(attacks.fgsm(_loss, jnp.asarray(X, jnp.float32), jnp.asarray(Y), eps=8 / 255))
  assert np.all(np.abs(out - X) <= 8 / 255 + 1e-6)
  assert out.min() >= 0 and out.max() <= 1
  assert np.all(_loss(jnp.asarray(out), jnp.asarray(Y)) >= _loss(jnp.asarray(X, jnp.float32),
                                                                  jnp.asarray(Y)) - 1e-5)


def test_registered_perturbation_uses_the_context():
  ctx = attacks.PerturbContext(
      logits_fn=lambda x: x @ jnp.asarray(W, jnp.float32) + jnp.asarray(B, jnp.float32),
      x=jnp.asarray(X, jnp.float32), labels=jnp.asarray(Y), mask=jnp.ones(16, bool),
      rng=jax.random.PRNGKey(0), num_classes=4)
  fn = attacks.build("fgsm(eps=0.03)")
  np.testing.assert_allclose(np.asarray(fn(ctx)), _np_fgsm(X, Y, 0.03), atol=1e-5)
  # Masked or unlabelled examples are not attacked.
  masked = ctx.__class__(**{**ctx.__dict__, "mask": jnp.zeros(16, bool)})
  np.testing.assert_allclose(np.asarray(fn(masked)), X, atol=1e-6)


def test_bad_options_are_named():
  with pytest.raises(RegistryError, match=r"streams.train.perturb: perturbation 'fgsm': eps "
                                          r"must be >= 0"):
    attacks.build("fgsm(eps=-0.1)", where="config.streams.train.perturb")
  with pytest.raises(RegistryError, match="labels must be 'true' or 'predicted'"):
    attacks.build("fgsm(labels='gold')")
  with pytest.raises(RegistryError, match="unknown perturbation 'fsgm'.*'fgsm'"):
    attacks.build("fsgm")


# --- PGD ---------------------------------------------------------------------------

XI = X.reshape(16, 2, 2, 3)  # images [B, H, W, C]; the linear model flattens them
# pgd jitted with eps, step_size and the box traced: one compilation per loss, steps and norm.
PGD = jax.jit(attacks.pgd, static_argnums=(0,),
              static_argnames=("steps", "norm", "random_start", "targeted"))


def _np_ce_grad(x, y):
  """d CE / d x of the linear softmax model, for images ``[B, 2, 2, 3]``."""
  flat = x.reshape(len(x), -1)
  z = flat @ W + B
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return ((p - np.eye(4)[y]) @ W.T).reshape(x.shape)


def _np_pgd(x, y, *, eps, step_size, steps, norm, targeted):
  """PGD from the clean x (no random start), written out in numpy."""
  adv = x.copy()
  for _ in range(steps):
    g = _np_ce_grad(adv, y) * (-1 if targeted else 1)
    if norm == "linf":
      adv = np.clip(adv + step_size * np.sign(g), x - eps, x + eps)
    else:
      gn = np.sqrt((g ** 2).sum((1, 2, 3), keepdims=True))
      adv = adv + step_size * g / gn
      d = adv - x
      dn = np.sqrt((d ** 2).sum((1, 2, 3), keepdims=True))
      adv = np.where(dn > eps, x + d / dn * eps, adv)
    adv = np.clip(adv, 0, 1)
  return adv


def _image_loss(x, y):
  return _loss(x.reshape(x.shape[0], -1), y)


def _ctx(x=XI, y=Y, dtype=jnp.float32, mask=None):
  w, b = jnp.asarray(W, dtype), jnp.asarray(B, dtype)
  return attacks.PerturbContext(
      logits_fn=lambda z: z.reshape(z.shape[0], -1) @ w + b, x=jnp.asarray(x, dtype),
      labels=jnp.asarray(y), mask=jnp.ones(len(y), bool) if mask is None else jnp.asarray(mask),
      rng=jax.random.PRNGKey(0), num_classes=4)


@pytest.mark.parametrize("norm,eps,step_size", [("linf", 0.05, 0.02), ("l2", 0.3, 0.1)])
@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_matches_numpy_on_the_closed_form_gradient(norm, eps, step_size, targeted):
  with jax.enable_x64(True):
    target = (Y + 1) % 4 if targeted else Y
    out = attacks.pgd(_image_loss, jnp.asarray(XI), jnp.asarray(target), eps=eps,
                      step_size=step_size, steps=5, norm=norm, random_start=False,
                      targeted=targeted, unroll=1 if targeted else True)  # both loop forms
    want = _np_pgd(XI, target, eps=eps, step_size=step_size, steps=5, norm=norm,
                   targeted=targeted)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
    assert np.abs(want - XI).max() > step_size / 2  # the steps moved (not a no-op match)


W1 = (RNG.normal(size=(48, 16)) / 7).astype(np.float32)
W2 = RNG.normal(size=(16, 5)).astype(np.float32)


def _mlp_loss(x, y):
  """A small random nonlinear model."""
  logits = jnp.tanh(x.reshape(x.shape[0], -1) @ W1) @ W2
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255),
                                      pytest.param("l2", 0.25, marks=pytest.mark.slow)])
def test_pgd_stays_in_the_eps_ball_and_the_box(norm, eps):
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (8, 4, 4, 3)).astype(np.float32)
  x[:2] = np.round(x[:2])  # pixels at 0 and 1: the box clamps
  y = jnp.asarray(rng.integers(0, 5, 8))
  out = PGD(_mlp_loss, jnp.asarray(x), y, eps=eps, step_size=eps, steps=4, norm=norm,
            rng=jax.random.PRNGKey(0))
  assert out.dtype == jnp.float32 and out.shape == x.shape
  d = np.asarray(out, np.float64) - x
  dist = (np.abs(d).max((1, 2, 3)) if norm == "linf"
          else np.sqrt((d ** 2).sum((1, 2, 3))))
  assert np.all(dist <= eps + 1e-6), dist
  assert dist.max() > 0.9 * eps  # steps of size eps reach the boundary
  assert np.asarray(out).min() >= 0 and np.asarray(out).max() <= 1
  loss = jax.jit(lambda z: _mlp_loss(z, y).mean())
  assert float(loss(out)) > float(loss(jnp.asarray(x)))


def test_pgd_is_at_least_as_strong_as_fgsm():
  ctx = _ctx()
  eps = 0.1

  def acc_and_loss(z):
    logits = ctx.logits_fn(z)
    return (float(jnp.mean(jnp.argmax(logits, -1) == ctx.labels)),
            float(ctx.cross_entropy(z, ctx.labels).mean()))

  clean_acc, clean_loss = acc_and_loss(ctx.x)
  fgsm_acc, fgsm_loss = acc_and_loss(attacks.build(f"fgsm(eps={eps})")(ctx))
  pgd_acc, pgd_loss = acc_and_loss(attacks.build(f"pgd(eps={eps}, step_size={eps / 4})")(ctx))
  assert clean_acc > 0
  assert pgd_acc <= fgsm_acc <= clean_acc and pgd_acc < clean_acc
  assert pgd_loss >= fgsm_loss - 1e-6 and pgd_loss > clean_loss


def test_pgd_is_deterministic_given_the_key():
  x, y = jnp.asarray(XI, jnp.float32), jnp.asarray(Y)
  # Step 0: the output is the random start (the box is passed as in the l2 check below, so
  # that these calls share one compilation per norm).
  kw = {"eps": 0.05, "step_size": 0.0, "steps": 1, "clip_min": 0.0, "clip_max": 1.0}
  for norm in ("linf", "l2"):
    a = PGD(_image_loss, x, y, norm=norm, rng=jax.random.PRNGKey(1), **kw)
    b = PGD(_image_loss, x, y, norm=norm, rng=jax.random.PRNGKey(1), **kw)
    c = PGD(_image_loss, x, y, norm=norm, rng=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - XI).max() > 1e-3  # there is a random start
  # The l2 start has a random norm <= eps, drawn per example.
  a = PGD(_image_loss, x, y, norm="l2", rng=jax.random.PRNGKey(1), eps=0.5, step_size=0.0,
          steps=1, clip_min=-10.0, clip_max=10.0)
  norms = np.sqrt(((np.asarray(a, np.float64) - XI) ** 2).sum((1, 2, 3)))
  assert np.all(norms <= 0.5 + 1e-6) and norms.std() > 0.05
  # Full attack: same key, same result; another key, another result.
  full = lambda k: np.asarray(PGD(_image_loss, x, y, eps=0.1, step_size=0.03, steps=3,
                                  norm="linf", rng=jax.random.PRNGKey(k)))
  np.testing.assert_array_equal(full(4), full(4))
  assert not np.array_equal(full(4), full(5))


def test_registered_pgd_targets_and_masks():
  # PGDTarget's target: uniform over the other classes; -1 stays -1.
  labels = jnp.asarray(np.tile(np.arange(-1, 4), 400), jnp.int32)
  t = np.asarray(attacks.random_other_class(jax.random.PRNGKey(0), labels, 4))
  lab = np.asarray(labels)
  assert np.all(t[lab == -1] == -1) and np.all(t[lab >= 0] != lab[lab >= 0])
  assert set(t[lab == 0]) == {1, 2, 3}
  with pytest.raises(RegistryError, match=">= 2 classes"):
    attacks.random_other_class(jax.random.PRNGKey(0), labels, 1)
  # Targeted PGD raises the target's probability; untargeted lowers the label's.
  ctx = _ctx()
  target = attacks.random_other_class(jax.random.split(ctx.rng)[1], ctx.labels, 4)
  prob = lambda z, c: jnp.take_along_axis(jax.nn.softmax(ctx.logits_fn(z)), c[:, None], 1)[:, 0]
  adv = attacks.build("pgd(eps=0.1, step_size=0.025, target='random')")(ctx)
  assert float(prob(adv, target).mean()) > float(prob(ctx.x, target).mean()) + 0.01
  adv = attacks.build("pgd(eps=0.1, step_size=0.025)")(ctx)
  assert float(prob(adv, ctx.labels).mean()) < float(prob(ctx.x, ctx.labels).mean()) - 0.01
  # Masked or unlabelled examples come back clean (no random start either).
  mask = np.arange(16) % 2 == 0
  y = np.where(np.arange(16) % 4 == 0, -1, Y)
  out = np.asarray(attacks.build("pgd")(_ctx(y=y, mask=mask)))
  kept = ~mask | (y < 0)
  np.testing.assert_array_equal(out[kept], XI.astype(np.float32)[kept])
  assert np.all(np.abs(out[~kept] - XI[~kept]).max((1, 2, 3)) > 1e-3)


def test_bad_pgd_options_are_named():
  for spec, msg in [("pgd(eps=-1)", "eps must be >= 0"),
                    ("pgd(step_size=-0.1)", "step_size must be >= 0"),
                    ("pgd(steps=0)", "steps must be an int >= 1"),
                    ("pgd(steps=2.5)", "steps must be an int >= 1"),
                    ("pgd(norm='l3')", "norm must be one of 'linf', 'l2'; got 'l3'"),
                    ("pgd(target='foo')", "target must be one of 'none', 'random'; got 'foo'"),
                    ("pgd(labels='gold')", "labels must be 'true' or 'predicted'")]:
    with pytest.raises(RegistryError, match=r"config.streams.train.perturb: perturbation 'pgd': "
                                            + msg.replace("(", r"\(")):
      attacks.build(spec, where="config.streams.train.perturb")
  x, y = jnp.asarray(XI, jnp.float32), jnp.asarray(Y)
  with pytest.raises(RegistryError, match="random_start=True needs rng"):
    attacks.pgd(_image_loss, x, y, eps=0.1, step_size=0.1, steps=1)
  with pytest.raises(RegistryError, match="norm must be one of"):
    attacks.pgd(_image_loss, x, y, eps=0.1, step_size=0.1, steps=1, norm="inf",
                random_start=False)
  with pytest.raises(RegistryError, match="steps must be an int >= 1"):
    attacks.pgd(_image_loss, x, y, eps=0.1, step_size=0.1, steps=0, random_start=False)


@pytest.mark.parametrize("norm", ["linf", pytest.param("l2", marks=pytest.mark.slow)])
def test_pgd_under_jit_with_a_sharded_batch(norm):
  from jaxrobust import sharding
  mesh = sharding.make_mesh((("data", -1),))
  assert mesh.size == 8
  data_sh = sharding.data_sharding(mesh, ("data",))
  x, y = jnp.asarray(XI, jnp.float32), jnp.asarray(Y)
  key = jax.random.PRNGKey(7)
  kw = {"eps": 0.1, "step_size": 0.03, "steps": 3, "norm": norm, "rng": key}
  sharded = PGD(_image_loss, jax.device_put(x, data_sh), jax.device_put(y, data_sh), **kw)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(PGD(_image_loss, x, y, **kw)),
                             atol=1e-6)
  assert np.abs(np.asarray(sharded) - XI).max() > 1e-3
