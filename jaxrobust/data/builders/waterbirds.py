"""`waterbirds`: CUB birds pasted on Places backgrounds (Sagawa et al. 2020).

Waterbirds ("Distributionally Robust Neural Networks", Sagawa, Koh, Hashimoto
& Liang, ICLR 2020; the benchmark of DFR, Kirichenko et al. 2023) is not in
tfds. This builder composes it as the reference script does
(kohpangwei/group_DRO ``dataset_scripts/generate_waterbirds.py`` and
``dataset_utils.py``), from the user's tfds copies of

* ``caltech_birds2011`` (CUB-200-2011 with segmentation masks; its official
  train/test split) and
* ``places365_small`` (Places365 at 256x256),

which must be prepared (array_record) in the same ``data_dir``; nothing is
downloaded. Construction:

1. **Label**: ``1`` (waterbird) when the CUB species name contains one of the
   script's seabird/waterfowl names (albatross, auklet, cormorant,
   frigatebird, fulmar, gull, jaeger, kittiwake, pelican, puffin, tern,
   gadwall, grebe, mallard, merganser, guillemot, pacific_loon), else ``0``.
2. **Splits**: CUB test -> ``test``; a uniformly random ``round(0.2 n)`` of
   CUB train -> ``validation``, the rest -> ``train`` (the script's
   ``val_frac = 0.2``).
3. **Background** ("place"; 0 land, 1 water): in ``train``, within each label,
   a random ``round(p n_y)`` get water, with ``p = 0.05`` for landbirds and
   ``0.95`` for waterbirds (``confounder_strength = 0.95``); in
   ``validation``/``test`` ``p = 0.5`` for both labels.
4. **Places**: land images are ``bamboo_forest`` and ``forest/broadleaf``,
   water images ``ocean`` and ``lake/natural`` (of ``places365_small``'s
   ``places_split``, default train); each kind is pooled, shuffled and dealt
   out without replacement, in example order (train, validation, test).
5. **Compositing** (``combine_and_mask``): with the CUB mask ``m = seg / 255``,
   ``bird = round(image * m)``; the place is cropped to the bird image's
   aspect ratio (centre) and resized to its size (``crop_and_resize``),
   ``background = round(place * (1 - m))``; ``image = bird + background``.
6. **Stored size** (departure: the script stores the composite at CUB's
   original size, and training code transforms it): the composite is resized
   to ``round(S * 256/224)`` square and centre-cropped to ``S`` -- group_DRO's
   and DFR's evaluation transform (``Resize((256, 256))``, ``CenterCrop(224)``)
   for ``S = 224`` -- so records have a fixed shape: ``waterbirds/224``
   (default, the paper's input size; about 1.8 GB raw uint8) or
   ``waterbirds/64`` (a small variant).

``group = 2 * label + place`` (0 landbird-land, 1 landbird-water, 2
waterbird-land, 3 waterbird-water); the real data give train groups
``[3498, 184, 56, 1057]`` (up to the random split). Randomness comes from one
``np.random.RandomState(config.seed)``, so sizes and counts match the script's
procedure, not its particular random draw (which used the unseeded global
numpy/``random`` state).

Building scans the labels of ``places365_small``'s split (1.8 M records for
train, images not decoded) and composes 11,788 images: minutes, once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxrobust.data.builders import _base

CUB = "caltech_birds2011"
PLACES = "places365_small"
WATER_BIRDS = ("albatross", "auklet", "cormorant", "frigatebird", "fulmar", "gull", "jaeger",
               "kittiwake", "pelican", "puffin", "tern", "gadwall", "grebe", "mallard",
               "merganser", "guillemot", "pacific_loon")
TARGET_PLACES = (("bamboo_forest", "forest/broadleaf"),  # land (place 0)
                 ("ocean", "lake/natural"))  # water (place 1)
CLASS_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")
GROUP_NAMES = tuple(f"{c}/{p}" for c in CLASS_NAMES for p in PLACE_NAMES)
SPLITS = ("train", "validation", "test")


def is_waterbird(species: Any) -> bool:
  """The script's rule: a seabird/waterfowl name occurs in the species name."""
  name = species.decode() if isinstance(species, bytes) else str(species)
  return any(w in name.lower() for w in WATER_BIRDS)


@dataclasses.dataclass(eq=False)
class WaterbirdsConfig(tfds.core.BuilderConfig):
  """Stored image size, the script's fractions, the seed and the Places split."""
  image_size: int = 224
  val_frac: float = 0.2
  confounder_strength: float = 0.95
  seed: int = 0
  places_split: str = "train"


def assign(labels: Mapping[str, np.ndarray], rng: np.random.RandomState,
           confounder_strength: float) -> dict[str, np.ndarray]:
  """Place (0 land, 1 water) per example of each split, as the script: within
  each label, a random ``round(p n_y)`` get water (train: ``p = 1 - s`` for
  label 0 and ``s`` for label 1; other splits ``p = 0.5``)."""
  out = {}
  for split in SPLITS:
    y = labels[split]
    place = np.zeros(len(y), np.int64)
    for label in (0, 1):
      ids = np.flatnonzero(y == label)
      p = (confounder_strength if label else 1 - confounder_strength) if split == "train" else 0.5
      place[rng.choice(ids, size=int(np.round(p * len(ids))), replace=False)] = 1
    out[split] = place
  return out


def crop_and_resize(place: np.ndarray, height: int, width: int) -> np.ndarray:
  """``place`` centre-cropped to the aspect ratio ``width / height`` and resized
  (Lanczos, as PIL's ANTIALIAS) to ``(height, width)``: ``dataset_utils.
  crop_and_resize`` (which first enlarges a smaller source; resizing the crop
  to the target gives the same geometry)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = place.shape[:2]
  if w / h > width / height:
    new_w = int(width / height * h)
    off = (w - new_w) // 2
    box = (off, 0, w - off, h)
  else:
    new_h = int(w / (width / height))
    off = (h - new_h) // 2
    box = (0, off, w, h - off)
  img = Image.fromarray(place).crop(box).resize((width, height), Image.Resampling.LANCZOS)
  return np.asarray(img)


def composite(image: np.ndarray, mask: np.ndarray, place: np.ndarray) -> np.ndarray:
  """``combine_and_mask``: the bird (soft mask ``mask / 255``) over the place."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  h, w = image.shape[:2]
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]
  if mask.shape != (h, w):  # never in CUB; mock data draws sizes independently
    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
  m = mask.astype(np.float64)[..., None] / 255.0
  bird = np.around(image * m).astype(np.uint8)
  background = np.around(crop_and_resize(place, h, w) * (1 - m)).astype(np.uint8)
  return bird + background


def to_stored_size(image: np.ndarray, size: int) -> np.ndarray:
  """Resize to ``round(size * 256 / 224)`` square (bilinear), centre crop ``size``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  big = int(round(size * 256 / 224))
  out = np.asarray(Image.fromarray(image).resize((big, big), Image.Resampling.BILINEAR))
  top = (big - size) // 2
  return out[top:top + size, top:top + size]


def _data_source(name: str, split: str, data_dir: str, skip: Sequence[str] = ()) -> Any:
  """A tfds data source of a source dataset (images listed in ``skip`` left
  undecoded when the reader supports it)."""
  from jaxrobust.data import sources  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  if skip:
    try:
      return builder.as_data_source(split=split,
                                    decoders={k: tfds.decode.SkipDecoding() for k in skip})
    except Exception:  # pylint: disable=broad-except
      pass  # read decoded: slower, same labels
  try:
    return sources._catalog_source(name, split, builder)  # pylint: disable=protected-access
  except ValueError as e:
    raise ValueError(f"waterbirds is composed from {CUB} and {PLACES} prepared in {data_dir}: "
                     f"{e}") from None


def _read(source: Any, keys: Sequence[str], chunk: int = 4096) -> list[dict]:
  out = []
  for start in range(0, len(source), chunk):
    idx = list(range(start, min(start + chunk, len(source))))
    recs = source.__getitems__(idx) if hasattr(source, "__getitems__") else [
        source[i] for i in idx]
    out.extend({k: r[k] for k in keys} for r in recs)
  return out


class Waterbirds(_base.EmbeddedBuilder):
  """Waterbirds composed from tfds ``caltech_birds2011`` and ``places365_small``.

  Features: ``image`` uint8 [S, S, 3], ``label`` (0 landbird, 1 waterbird),
  ``group`` (``2 * label + place``), ``place`` (0 land, 1 water background),
  ``species`` (the CUB class, 0-199). Splits ``train`` / ``validation`` /
  ``test`` (4,795 / 1,199 / 5,794 with the full CUB). See the module
  docstring for the construction; configs ``224`` (default) and ``64`` set
  the stored size S.
  """

  BUILDER_CONFIGS = [
      WaterbirdsConfig(name="224", description="224x224, the paper's input size."),
      WaterbirdsConfig(name="64", description="64x64, a small variant.", image_size=64),
  ]
  DEFAULT_CONFIG_NAME = "224"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        "group": tfds.features.ClassLabel(names=list(GROUP_NAMES)),
        "place": tfds.features.ClassLabel(names=list(PLACE_NAMES)),
        "species": tfds.features.ClassLabel(num_classes=200),
    })
    return self._dataset_info(features, description=__doc__)

  def plan(self) -> dict[str, dict[str, np.ndarray]]:
    """Per split: ``cub_split`` (0 train, 1 test), ``cub_index``, ``label``,
    ``species``, ``place`` and ``place_index`` (into the Places split)."""
    cfg, root = self.builder_config, str(self.data_dir_root)
    rng = np.random.RandomState(cfg.seed)
    cub = {s: _read(_data_source(CUB, s, root, skip=("image", "segmentation_mask")),
                    ("label", "label_name")) for s in ("train", "test")}
    n_train = len(cub["train"])
    val = np.sort(rng.choice(n_train, size=int(np.round(cfg.val_frac * n_train)),
                             replace=False))
    index = {"train": np.setdiff1d(np.arange(n_train), val), "validation": val,
             "test": np.arange(len(cub["test"]))}
    plan: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
      recs = cub["test" if split == "test" else "train"]
      plan[split] = {
          "cub_split": np.full(len(index[split]), int(split == "test")),
          "cub_index": index[split],
          "label": np.array([is_waterbird(recs[i]["label_name"]) for i in index[split]],
                            np.int64),
          "species": np.array([int(recs[i]["label"]) for i in index[split]], np.int64),
      }
    places = assign({s: plan[s]["label"] for s in SPLITS}, rng, cfg.confounder_strength)
    names = tfds.builder(PLACES, data_dir=root).info.features["label"].names
    place_labels = np.array([int(r["label"]) for r in _read(
        _data_source(PLACES, cfg.places_split, root, skip=("image",)), ("label",))])
    for kind, categories in enumerate(TARGET_PLACES):
      pool = np.flatnonzero(np.isin(place_labels, [names.index(c) for c in categories]))
      pool = rng.permutation(pool)
      need = sum(int(np.sum(places[s] == kind)) for s in SPLITS)
      if len(pool) < need:
        raise ValueError(
            f"waterbirds: {PLACES}:{cfg.places_split} has {len(pool)} images of "
            f"{' + '.join(categories)}; {need} are needed (use places_split='train').")
      start = 0
      for split in SPLITS:
        sel = np.flatnonzero(places[split] == kind)
        plan[split].setdefault("place_index", np.zeros(len(places[split]), np.int64))
        plan[split]["place_index"][sel] = pool[start:start + len(sel)]
        start += len(sel)
    for split in SPLITS:
      plan[split]["place"] = places[split]
    return plan

  def split_sizes(self) -> dict[str, int]:
    return {s: len(v["label"]) for s, v in self._plan.items()}

  def _split_generators(self, dl_manager):
    del dl_manager  # composed from data_dir: nothing to download
    self._plan = self.plan()
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    cfg, root, plan = self.builder_config, str(self.data_dir_root), self._plan[split]
    cub = {s: _data_source(CUB, s, root) for s in ("train", "test")}
    places = _data_source(PLACES, cfg.places_split, root)
    for i in range(len(plan["label"])):
      bird = cub["test" if plan["cub_split"][i] else "train"][int(plan["cub_index"][i])]
      place = np.asarray(places[int(plan["place_index"][i])]["image"])
      image = composite(bird["image"], bird["segmentation_mask"], place)
      label, where = int(plan["label"][i]), int(plan["place"][i])
      yield i, {"image": to_stored_size(image, cfg.image_size), "label": label,
                "group": 2 * label + where, "place": where, "species": int(plan["species"][i])}
