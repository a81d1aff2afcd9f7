"""A-SKD: attention similarity knowledge distillation (Shin, Lee, Kim, Lee,
"Teaching Where to Look", ECCV 2022), and the distillation baselines it is
compared with.

A teacher (a CBAM network, :mod:`jaxrobust.models.cbam`, ``cbam=True``) is
trained on high-resolution images; a student of the same architecture trains
on the same images down-sampled by 2, 4 or 8 and up-sampled back to the input
size, with the frozen teacher beside it as a second module. The student's loss
is ArcFace (:mod:`jaxrobust.methods.arcface`) or CE plus λ times, for every CBAM
block and for both its channel and its spatial map, the cosine distance
between the student's and the teacher's maps.

Reference followed: gist-ailab/teaching-where-to-look (``train_student.py``,
``utility/distill_loss.py``, ``model/backbone.py``, ``dataset/casia_webface.py``):

* the maps are CBAM's *pre-sigmoid* outputs (``attn_out``): channel ``[B, C]``
  and spatial ``[B, H, W, 1]`` of every block (the model outputs
  ``attention/<block>/channel|spatial``);
* each map is flattened per example; the term is ``mean_batch(1 − cos(s, t))``
  (``F.cosine_similarity``, eps 1e-8), summed over the maps, times
  ``distill_attn_param`` λ = 5 (here: the term's ``weight``);
* the teacher runs in eval mode on the high-resolution image, without
  gradient;
* down-sampling (``pp`` op ``downsample(factor)``): ``F.interpolate`` with its
  default *nearest* mode to ``H / factor`` and back to ``H``, then the
  reference's ``gaussian_blur(kernel_size=[5, 5], sigma=[0.1, 2.0])``: a 5x5
  separable Gaussian with σ_x = 0.1 and σ_y = 2.0, reflect padding
  (``blur=False`` leaves it out). Student and teacher maps then have the same
  sizes; maps of different sizes (a teacher fed another resolution) need a
  declared ``resize`` ('nearest' or 'bilinear', the student's maps resized to
  the teacher's).

Departures: the teacher sees ``batch[stream]['image']``, the stream's image
*before* its pp chain, so the student's chain must be deterministic up to the
down-sampling (``pp='downsample(4)'``; the reference flips the high- and
low-resolution image together, which a pp chain cannot share with the
teacher's input). The reference trains an iResNet-50 with CBAM on
CASIA-WebFace (112x112) and evaluates on AgeDB-30; the recipe here runs the
zoo's residual models.

Baselines (loss terms, each with ``teacher`` = the teacher module's name):

* ``logit_kd(temperature=4)``: Hinton et al. 2015, ``τ² · KL(softmax(t/τ) ‖
  softmax(s/τ))`` per example, mean over the batch (RepDistiller's
  ``DistillKL``);
* ``feature_distill``: FitNets-style L2 between the penultimate features,
  ``mean((f_s − f_t)²)`` over elements (``nn.MSELoss``);
* ``attention_transfer(beta=1000)``: Zagoruyko & Komodakis 2017
  (szagoruyko/attention-transfer ``utils.py``: ``at(x) = normalize(mean_c
  x²)``, ``at_loss = mean((at(x_s) − at(x_t))²)``, total ``β/2 · Σ at_loss``)
  over the block outputs ``activation/<block>`` of CBAM models (``blocks``
  regex: the reference uses the output of each group).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxrobust.data import pp
from jaxrobust.losses import LOSSES, LossInputs, masked_mean
from jaxrobust.registry import RegistryError

Array = jax.Array
LAMBDA = 5.0  # train_student.py --distill_attn_param
FACTORS = (2, 4, 8)  # 112 -> 56, 28, 14
BLUR_KERNEL = 5
BLUR_SIGMA = (0.1, 2.0)  # (σ_x, σ_y), as the reference passes them
COS_EPS = 1e-8
RESIZES = ("none", "nearest", "bilinear")
_PROBE = (2, 8, 8, 3)  # pp.build's trace probe: its size says nothing of the data's


# --- down-sampling ------------------------------------------------------------------------


def _gaussian_1d(size: int, sigma: float) -> Array:
  x = jnp.linspace(-(size - 1) / 2, (size - 1) / 2, size)
  k = jnp.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def gaussian_blur(images: Array, kernel: int = BLUR_KERNEL,
                  sigma: tuple[float, float] = BLUR_SIGMA) -> Array:
  """Separable Gaussian blur of ``[B, H, W, C]`` with reflect padding; ``sigma``
  is ``(σ_x, σ_y)`` (width, height), torchvision's order."""
  kx, ky = _gaussian_1d(kernel, sigma[0]), _gaussian_1d(kernel, sigma[1])
  r = kernel // 2
  x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  h, w = images.shape[1:3]
  x = sum(ky[i] * x[:, i:i + h] for i in range(kernel))
  return sum(kx[j] * x[:, :, j:j + w] for j in range(kernel))


def down_up(images: Array, factor: int) -> Array:
  """Nearest down-sampling by ``factor`` and nearest up-sampling back
  (``F.interpolate`` twice): pixel ``(i, j)`` takes ``(⌊i/f⌋ f, ⌊j/f⌋ f)``."""
  small = images[:, ::factor, ::factor]
  return jnp.repeat(jnp.repeat(small, factor, axis=1), factor, axis=2)


@pp.OPS.register("downsample")
def downsample(rng: Array, images: Array, factor: int = 4, blur: bool = True) -> Array:
  """A-SKD's low-resolution input: nearest ×1/``factor`` then back to the input
  size, then the reference's 5x5 Gaussian blur (``blur``). ``factor`` must
  divide the image's height and width."""
  del rng
  if isinstance(factor, bool) or int(factor) != factor or factor < 1:
    raise RegistryError(f"downsample(factor={factor!r}): factor must be a positive integer.")
  factor = int(factor)
  h, w = images.shape[1:3]
  if tuple(images.shape) != _PROBE and (h % factor or w % factor):
    raise RegistryError(f"downsample(factor={factor}): the factor does not divide the image "
                        f"size {h}x{w}; pick a divisor (A-SKD: 2, 4, 8 of 112).")
  if factor > 1 and tuple(images.shape) != _PROBE:
    images = down_up(images, factor)
  if blur:
    images = gaussian_blur(images)
  return images


# --- the teacher's outputs ---------------------------------------------------------------


def teacher_outputs(inputs: LossInputs, teacher: str, stream: str) -> Mapping[str, Array]:
  """The frozen ``teacher`` module on the stream's image before its pp chain
  (eval mode, no gradient)."""
  if inputs.call is None:
    raise RegistryError("the teacher's outputs need LossInputs.call (the train step's).")
  try:
    out = inputs.call(teacher, inputs.batch[stream]["image"], train=False, stats="discard")
  except KeyError as e:
    raise RegistryError(f"teacher={teacher!r}: {e.args[0]} Add the teacher in "
                        f"config.modules.{teacher} (init_from its checkpoint).") from None
  return jax.tree.map(jax.lax.stop_gradient, dict(out))


def _maps(outputs: Mapping[str, Array], prefix: str, kinds: tuple[str, ...], blocks: str
          ) -> dict[str, Array]:
  regex = re.compile(blocks or ".*")
  out = {}
  for k, v in outputs.items():
    parts = k.split("/")
    if parts[0] != prefix or not regex.fullmatch(parts[1]):
      continue
    if prefix == "attention" and parts[2] not in kinds:
      continue
    out[k] = v
  return out


def _resize_to(x: Array, shape: tuple[int, ...], method: str) -> Array:
  return jax.image.resize(x, x.shape[:1] + tuple(shape[1:]), method=method)


def _paired(student: Mapping[str, Array], teacher: Mapping[str, Array], resize: str,
            term: str) -> list[tuple[str, Array, Array]]:
  if resize not in RESIZES:
    raise RegistryError(f"{term}: resize must be one of {RESIZES}, got {resize!r}.")
  if not student:
    raise RegistryError(f"{term}: the student has no such maps; train a CBAM model "
                        "(config.model.kwargs.cbam=True).")
  missing = sorted(set(student) - set(teacher))
  if missing:
    raise RegistryError(f"{term}: the teacher has no map {missing[0]!r} (a teacher of another "
                        f"architecture? it has {len(teacher)} such maps); the teacher module "
                        "must be the student's architecture with cbam=True.")
  pairs = []
  for k, s in student.items():
    t = teacher[k]
    if s.shape[1:] != t.shape[1:]:
      if s.ndim != 4 or t.ndim != 4 or s.shape[-1] != t.shape[-1] or resize == "none":
        raise RegistryError(
            f"{term}: map {k!r} is {s.shape[1:]} for the student and {t.shape[1:]} for the "
            "teacher; feed both the same image size or declare resize='nearest'|'bilinear'.")
      s = _resize_to(s, t.shape, resize)
    pairs.append((k, s, t))
  return pairs


def cosine_distance(s: Array, t: Array) -> Array:
  """``1 − cos(s, t)`` per example of flattened maps (``F.cosine_similarity``)."""
  s = s.reshape(s.shape[0], -1).astype(jnp.float32)
  t = t.reshape(t.shape[0], -1).astype(jnp.float32)
  ns = jnp.maximum(jnp.linalg.norm(s, axis=-1), COS_EPS)
  nt = jnp.maximum(jnp.linalg.norm(t, axis=-1), COS_EPS)
  return 1.0 - jnp.sum(s * t, axis=-1) / (ns * nt)


def _check_kinds(options: Mapping[str, Any], num_classes: int | None) -> None:
  del num_classes
  kinds = tuple(options.get("kinds", ("channel", "spatial")))
  if not kinds or any(k not in ("channel", "spatial") for k in kinds):
    raise RegistryError(f"kinds must be a non-empty subset of ('channel', 'spatial'), got "
                        f"{kinds!r}.")
  if options.get("resize", "none") not in RESIZES:
    raise RegistryError(f"resize must be one of {RESIZES}, got {options.get('resize')!r}.")


@LOSSES.register("attention_similarity", info={"check": _check_kinds})
def attention_similarity(inputs: LossInputs, *, teacher: str = "teacher", stream: str = "train",
                         kinds: tuple[str, ...] = ("channel", "spatial"), blocks: str = ".*",
                         resize: str = "none") -> tuple[Array, dict[str, Array]]:
  """A-SKD: ``Σ_maps mean_batch(1 − cos(student map, teacher map))`` over the
  CBAM maps of ``kinds`` of the blocks matching ``blocks`` (λ is the term's
  ``weight``; the reference's is 5)."""
  student = _maps(inputs.outputs[stream], "attention", tuple(kinds), blocks)
  teacher_maps = _maps(teacher_outputs(inputs, teacher, stream), "attention", tuple(kinds),
                       ".*")
  mask = inputs.batch[stream]["mask"]
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for kind in kinds:
    kind_pairs = [(k, s, t) for k, s, t in _paired(student, teacher_maps, resize,
                                                    "attention_similarity")
                  if k.endswith("/" + kind)]
    part = sum((masked_mean(cosine_distance(s, t), mask) for _, s, t in kind_pairs),
               jnp.zeros((), jnp.float32))
    metrics[f"{stream}/attention_distance/{kind}"] = part
    total = total + part
  return total, metrics


# --- baselines -------------------------------------------------------------------------------


def kd_loss(student_logits: Array, teacher_logits: Array, mask: Array | None = None, *,
            temperature: float = 4.0) -> Array:
  """Hinton et al.'s ``τ² · KL(p_t^τ ‖ p_s^τ)``, mean over valid rows."""
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return masked_mean(kl, mask) * temperature**2


def _check_temperature(options: Mapping[str, Any], num_classes: int | None) -> None:
  del num_classes
  if not options.get("temperature", 4.0) > 0:
    raise RegistryError(f"temperature must be > 0, got {options.get('temperature')!r}.")


@LOSSES.register("logit_kd", info={"check": _check_temperature})
def logit_kd(inputs: LossInputs, *, teacher: str = "teacher", stream: str = "train",
             temperature: float = 4.0) -> tuple[Array, dict[str, Array]]:
  """Logit distillation from the teacher (Hinton et al. 2015)."""
  t = teacher_outputs(inputs, teacher, stream)
  value = kd_loss(inputs.outputs[stream]["logits"], t["logits"], inputs.batch[stream]["mask"],
                  temperature=temperature)
  return value, {}


@LOSSES.register("feature_distill")
def feature_distill(inputs: LossInputs, *, teacher: str = "teacher", stream: str = "train"
                    ) -> tuple[Array, dict[str, Array]]:
  """``mean((f_s − f_t)²)`` of the penultimate features over valid rows."""
  t = teacher_outputs(inputs, teacher, stream)["features"]
  s = inputs.outputs[stream]["features"]
  if s.shape[1:] != t.shape[1:]:
    raise RegistryError(f"feature_distill: student features {s.shape[1:]}, teacher "
                        f"{t.shape[1:]}; the teacher must have the student's feature width.")
  per = jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2, axis=-1)
  return masked_mean(per, inputs.batch[stream]["mask"]), {}


def at_map(x: Array, p: float = 2.0) -> Array:
  """``normalize(mean_c |x|^p)`` per example, flattened (``utils.at``)."""
  a = jnp.mean(jnp.abs(x.astype(jnp.float32)) ** p, axis=-1).reshape(x.shape[0], -1)
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


@LOSSES.register("attention_transfer")
def attention_transfer(inputs: LossInputs, *, teacher: str = "teacher", stream: str = "train",
                       beta: float = 1000.0, p: float = 2.0, blocks: str = ".*",
                       resize: str = "none") -> tuple[Array, dict[str, Array]]:
  """Zagoruyko & Komodakis's ``β/2 · Σ_blocks mean((at(s) − at(t))²)`` over
  the block outputs ``activation/<block>`` (valid rows only)."""
  student = _maps(inputs.outputs[stream], "activation", (), blocks)
  teacher_maps = _maps(teacher_outputs(inputs, teacher, stream), "activation", (), ".*")
  mask = inputs.batch[stream]["mask"]
  total = jnp.zeros((), jnp.float32)
  for _, s, t in _paired(student, teacher_maps, resize, "attention_transfer"):
    diff = (at_map(s, p) - at_map(t, p)) ** 2
    total = total + masked_mean(jnp.mean(diff, axis=-1), mask)
  return beta / 2 * total, {}


def student_modules(teacher_checkpoint: str, model: Mapping[str, Any], *,
                    name: str = "teacher") -> dict[str, Any]:
  """``config.modules`` entry of the frozen teacher: the student's ``model``
  loaded from ``teacher_checkpoint`` with every parameter required to fit
  (``reset_head='never'``), trained by no update."""
  return {name: dict(model=dict(model), init_from=dict(path=teacher_checkpoint,
                                                       reset_head="never"))}


__all__ = ["LAMBDA", "FACTORS", "attention_similarity", "attention_transfer", "at_map",
           "cosine_distance", "down_up", "downsample", "feature_distill", "gaussian_blur",
           "kd_loss", "logit_kd", "student_modules", "teacher_outputs"]
