"""Weights between jaxrobust (Flax) and PyTorch ``state_dict`` layouts, both ways.

Numpy only: this module imports neither torch nor jax, so it serves checkpoint
loading, the PyTorch parity tests (``tests/parity``) and the benchmarks alike.
A PyTorch ``state_dict`` is handled as a mapping ``name -> array`` (numpy
arrays; torch tensors are accepted on import and read through ``.numpy()``).

:func:`to_torch` ``(params, batch_stats, *, arch) -> {name: np.ndarray}`` and
:func:`from_torch` ``(state_dict, *, arch, params_template=None) -> (params,
batch_stats)``.

Architectures (``arch``):

* ``'wrn'`` -- :class:`jaxrobust.models.wide_resnet.WideResNet` <-> the
  WideResNet of ``hendrycks/pre-training`` (``*/models/wrn.py``), which
  ``hendrycks/outlier-exposure`` and ``wetliu/energy_ood`` share
  (``CIFAR/models/wrn.py``)::

      stem                      <-> conv1
      group{g}_block{b}/bn1     <-> block{g}.layer.{b-1}.bn1      (also bn2)
      group{g}_block{b}/conv1   <-> block{g}.layer.{b-1}.conv1    (also conv2)
      group{g}_block{b}/shortcut<-> block{g}.layer.{b-1}.convShortcut
      bn                        <-> bn1
      head                      <-> fc

* ``'resnet50'`` -- :class:`jaxrobust.models.resnet.ResNet50` <-> torchvision's
  ``resnet50`` (v1.5)::

      conv1, bn1                <-> conv1, bn1
      layer{s}_block{b}/convN   <-> layer{s}.{b-1}.convN          (N = 1, 2, 3; also bnN)
      layer{s}_block{b}/downsample_conv, downsample_bn
                                <-> layer{s}.{b-1}.downsample.0, downsample.1
      head                      <-> fc

* ``'vgg13'`` -- :class:`jaxrobust.models.vgg.VGG` (``vgg13``, ``vgg13_bn``) <->
  the VGG-13 of ``alinlab/Confident_classifier`` (``src/models/vgg.py``)::

      conv{i} (kernel, bias)    <-> features.{j}      (j = 0, 2, 5, 7, 10, 12, 15, 17, 20, 22)
      fc1, fc2, head            <-> classifier.0, classifier.3, classifier.6

  With BatchNorm (``vgg13_bn``), torchvision's ``make_layers(batch_norm=True)``
  indices: ``conv{i}`` <-> ``features.{j}`` and ``bn{i}`` <-> ``features.{j+1}``
  (j = 0, 3, 7, 10, 14, 17, 21, 24, 28, 31).

* ``'dcgan_generator'`` / ``'dcgan_discriminator'`` --
  :class:`jaxrobust.models.dcgan.DCGANGenerator` /
  :class:`~jaxrobust.models.dcgan.DCGANDiscriminator` <-> ``_netG`` / ``_netD``
  of ``alinlab/Confident_classifier`` (``src/models/gan.py``)::

      deconv1..4                <-> main.0, main.3, main.6, main.9     (generator)
      bn1..3                    <-> main.1, main.4, main.7
      conv1..4                  <-> main.0, main.2, main.5, main.8     (discriminator)
      bn2, bn3                  <-> main.3, main.6

Conventions:

* convolution kernels: Flax HWIO ``[kh, kw, in, out]`` <-> PyTorch OIHW
  ``[out, in, kh, kw]``;
* transposed convolution kernels: Flax ``nn.ConvTranspose`` (``transpose_kernel=False``)
  ``[kh, kw, in, out]`` <-> ``nn.ConvTranspose2d.weight`` ``[in, out, kh, kw]``,
  flipped in both spatial axes (PyTorch's transposed convolution is the
  gradient of a convolution, i.e. a convolution of the dilated input with the
  flipped kernel; flax's applies its kernel as it is);
* dense kernels: Flax ``[in, out]`` <-> ``nn.Linear.weight`` ``[out, in]``;
  biases as they are;
* BatchNorm: ``params`` ``scale``/``bias`` <-> ``weight``/``bias``;
  ``batch_stats`` ``mean``/``var`` <-> ``running_mean``/``running_var``.
  ``num_batches_tracked`` is written as 0 (int64) and ignored on import (it
  only matters to PyTorch's ``momentum=None``; PyTorch 0.4.0 checkpoints, such
  as the ``hendrycks/pre-training`` snapshots, do not have it);
* a ``module.`` prefix on every key (``nn.DataParallel``) is dropped on import.

Files (:func:`read_state_dict`): a ``state_dict`` saved by ``torch.save``
(``.pt``, ``.pth``, ``.pth.tar``, ``.bin``; the PyTorch >= 1.6 zip format and
the legacy format of PyTorch 0.4, which the ``hendrycks`` / ``energy_ood``
snapshots use) is read with ``torch.load(weights_only=True)``, which unpickles
no code, only tensors and plain containers; ``.npz`` (``np.load`` with
``allow_pickle=False``) and ``.safetensors`` (an 8-byte little-endian header
length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw
little-endian buffer, read here with numpy: the ``safetensors`` package is not
needed) are read without torch. A checkpoint that wraps its state_dict in a
dict (``{'state_dict': ..., 'epoch': ...}``) is unwrapped;
:func:`detect_arch` names the architecture of a state_dict from its keys.

The layout (every name and its shape) is derived from the architecture's
hyper-parameters (WRN: depth, width, classes, input channels; ResNet-50:
classes, input channels; VGG-13: classes, input channels, BatchNorm or not;
DCGAN: ``nz``, ``ngf`` / ``ndf``, image channels), read from the given tree. A state_dict or a tree
that does not fit it -- a missing key, an unexpected key, a shape mismatch,
another architecture -- is one ``ValueError`` that names the key; nothing is
ever partially loaded.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

ARCHS = ("wrn", "resnet50", "vgg13", "dcgan_generator", "dcgan_discriminator")
NUM_BATCHES_TRACKED = "num_batches_tracked"

# A layout: torch name -> (torch shape, flax collection, flax path, kind), in
# the torch module order. kind: 'conv' | 'convT' | 'dense' | 'bias' | 'bn' | 'stat' | 'count'.
Layout = dict[str, tuple[tuple[int, ...], str, str, str]]

_BN_LEAVES = (("weight", "params", "scale", "bn"), ("bias", "params", "bias", "bn"),
              ("running_mean", "batch_stats", "mean", "stat"),
              ("running_var", "batch_stats", "var", "stat"))


def _conv(layout: Layout, torch_name: str, flax_path: str, cin: int, cout: int, k: int) -> None:
  layout[f"{torch_name}.weight"] = ((cout, cin, k, k), "params", f"{flax_path}/kernel", "conv")


def _conv_t(layout: Layout, torch_name: str, flax_path: str, cin: int, cout: int,
            k: int) -> None:
  layout[f"{torch_name}.weight"] = ((cin, cout, k, k), "params", f"{flax_path}/kernel", "convT")


def _bn(layout: Layout, torch_name: str, flax_path: str, c: int) -> None:
  for leaf, collection, flax_leaf, kind in _BN_LEAVES:
    layout[f"{torch_name}.{leaf}"] = ((c,), collection, f"{flax_path}/{flax_leaf}", kind)
  layout[f"{torch_name}.{NUM_BATCHES_TRACKED}"] = ((), "", "", "count")


def _fc(layout: Layout, cin: int, k: int) -> None:
  layout["fc.weight"] = ((k, cin), "params", "head/kernel", "dense")
  layout["fc.bias"] = ((k,), "params", "head/bias", "bias")


def wrn_layout(depth: int, width: int, num_classes: int, in_channels: int = 3) -> Layout:
  """The ``hendrycks`` WideResNet-``depth``-``width`` state_dict layout
  (PyTorch module order) and where each entry lives in jaxrobust's tree."""
  if (depth - 4) % 6 or depth < 10 or width < 1:
    raise ValueError(f"a WideResNet has depth 6n+4 (n >= 1) and width >= 1; got depth={depth}, "
                     f"width={width}.")
  n = (depth - 4) // 6
  layout: Layout = {}
  _conv(layout, "conv1", "stem", in_channels, 16, 3)
  cin = 16
  for g, (cout, stride) in enumerate([(16 * width, 1), (32 * width, 2), (64 * width, 2)], 1):
    for b in range(n):
      t, f = f"block{g}.layer.{b}", f"group{g}_block{b + 1}"
      s = stride if b == 0 else 1
      _bn(layout, f"{t}.bn1", f"{f}/bn1", cin)
      _conv(layout, f"{t}.conv1", f"{f}/conv1", cin, cout, 3)
      _bn(layout, f"{t}.bn2", f"{f}/bn2", cout)
      _conv(layout, f"{t}.conv2", f"{f}/conv2", cout, cout, 3)
      if cin != cout or s != 1:  # wrn.py: a 1x1 convShortcut when not equalInOut
        _conv(layout, f"{t}.convShortcut", f"{f}/shortcut", cin, cout, 1)
      cin = cout
  _bn(layout, "bn1", "bn", cin)
  _fc(layout, cin, num_classes)
  return layout


RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def resnet50_layout(num_classes: int, in_channels: int = 3) -> Layout:
  """torchvision's ``resnet50`` state_dict layout (module order) and where
  each entry lives in jaxrobust's tree."""
  layout: Layout = {}
  _conv(layout, "conv1", "conv1", in_channels, 64, 7)
  _bn(layout, "bn1", "bn1", 64)
  cin = 64
  for s, (width, blocks, stride) in enumerate(RESNET50_STAGES, 1):
    for b in range(blocks):
      t, f = f"layer{s}.{b}", f"layer{s}_block{b + 1}"
      out = 4 * width
      for i, (ci, co, k) in enumerate([(cin, width, 1), (width, width, 3), (width, out, 1)], 1):
        _conv(layout, f"{t}.conv{i}", f"{f}/conv{i}", ci, co, k)
        _bn(layout, f"{t}.bn{i}", f"{f}/bn{i}", co)
      if cin != out or (stride if b == 0 else 1) != 1:
        _conv(layout, f"{t}.downsample.0", f"{f}/downsample_conv", cin, out, 1)
        _bn(layout, f"{t}.downsample.1", f"{f}/downsample_bn", out)
      cin = out
  _fc(layout, cin, num_classes)
  return layout


#: VGG configuration "B" (the same as :data:`jaxrobust.models.vgg.VGG13`; this
#: module imports no jax).
VGG13 = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG_HIDDEN = 512


def vgg13_layout(num_classes: int, in_channels: int = 3, batch_norm: bool = False) -> Layout:
  """The ``Confident_classifier`` VGG-13 state_dict layout (torchvision's
  ``make_layers`` indices; with ``batch_norm``, those of ``vgg13_bn``) and
  where each entry lives in jaxrobust's tree."""
  layout: Layout = {}
  j, i, cin = 0, 0, in_channels
  for v in VGG13:
    if v == "M":
      j += 1
      continue
    i += 1
    _conv(layout, f"features.{j}", f"conv{i}", cin, v, 3)
    layout[f"features.{j}.bias"] = ((v,), "params", f"conv{i}/bias", "bias")
    if batch_norm:
      _bn(layout, f"features.{j + 1}", f"bn{i}", v)
    j += 3 if batch_norm else 2  # conv, (BatchNorm,) ReLU
    cin = v
  for t, f, cout in [(0, "fc1", VGG_HIDDEN), (3, "fc2", VGG_HIDDEN), (6, "head", num_classes)]:
    layout[f"classifier.{t}.weight"] = ((cout, cin), "params", f"{f}/kernel", "dense")
    layout[f"classifier.{t}.bias"] = ((cout,), "params", f"{f}/bias", "bias")
    cin = cout
  return layout


def dcgan_generator_layout(nz: int, ngf: int, nc: int) -> Layout:
  """The ``Confident_classifier`` ``_netG`` state_dict layout and where each
  entry lives in jaxrobust's tree."""
  layout: Layout = {}
  widths = [nz, ngf * 8, ngf * 4, ngf * 2, nc]
  for i in range(1, 5):
    _conv_t(layout, f"main.{3 * (i - 1)}", f"deconv{i}", widths[i - 1], widths[i], 4)
    if i < 4:
      _bn(layout, f"main.{3 * (i - 1) + 1}", f"bn{i}", widths[i])
  return layout


def dcgan_discriminator_layout(nc: int, ndf: int) -> Layout:
  """The ``Confident_classifier`` ``_netD`` state_dict layout and where each
  entry lives in jaxrobust's tree."""
  layout: Layout = {}
  _conv(layout, "main.0", "conv1", nc, ndf * 2, 4)
  _conv(layout, "main.2", "conv2", ndf * 2, ndf * 4, 4)
  _bn(layout, "main.3", "bn2", ndf * 4)
  _conv(layout, "main.5", "conv3", ndf * 4, ndf * 8, 4)
  _bn(layout, "main.6", "bn3", ndf * 8)
  _conv(layout, "main.8", "conv4", ndf * 8, 1, 4)
  return layout


# --- reading the hyper-parameters of a tree or a state_dict -------------------------

def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in (tree or {}).items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flat(v, path + "/"))
    else:
      out[path] = v
  return out


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def _need(table: Mapping[str, Any], key: str, what: str, ndim: int) -> tuple[int, ...]:
  if key not in table:
    raise ValueError(f"{what}: missing key {key!r}; not a tree of this architecture "
                     f"(it has {_sample(table)}).")
  shape = tuple(np.shape(table[key]))
  if len(shape) != ndim:
    raise ValueError(f"{what}: {key!r} has shape {shape}, expected rank {ndim}.")
  return shape


def _sample(table: Mapping[str, Any]) -> str:
  keys = list(table)
  return ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "") or "no keys"


def _check_arch(arch: str) -> None:
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}.")


def _layout_of_flax(flat_params: Mapping[str, Any], arch: str) -> Layout:
  what = f"to_torch(arch={arch!r})"
  if arch == "wrn":
    stem = _need(flat_params, "stem/kernel", what, 4)
    head = _need(flat_params, "head/kernel", what, 2)
    blocks = {int(m.group(1)) for p in flat_params
              if (m := re.fullmatch(r"group1_block(\d+)/.*", p))}
    width = _need(flat_params, "group1_block1/conv1/kernel", what, 4)[3] // 16
    return wrn_layout(6 * len(blocks) + 4, width, head[1], stem[2])
  if arch == "vgg13":
    head = _need(flat_params, "head/kernel", what, 2)
    conv1 = _need(flat_params, "conv1/kernel", what, 4)
    return vgg13_layout(head[1], conv1[2], batch_norm="bn1/scale" in flat_params)
  if arch == "dcgan_generator":
    first = _need(flat_params, "deconv1/kernel", what, 4)
    last = _need(flat_params, "deconv4/kernel", what, 4)
    return dcgan_generator_layout(first[2], first[3] // 8, last[3])
  if arch == "dcgan_discriminator":
    first = _need(flat_params, "conv1/kernel", what, 4)
    return dcgan_discriminator_layout(first[2], first[3] // 2)
  head = _need(flat_params, "head/kernel", what, 2)
  return resnet50_layout(head[1], _need(flat_params, "conv1/kernel", what, 4)[2])


def _layout_of_torch(sd: Mapping[str, Any], arch: str) -> Layout:
  what = f"from_torch(arch={arch!r})"
  if arch == "vgg13":
    head = _need(sd, "classifier.6.weight", what, 2)
    first = _need(sd, "features.0.weight", what, 4)
    return vgg13_layout(head[0], first[1], batch_norm="features.1.weight" in sd)
  if arch == "dcgan_generator":
    first = _need(sd, "main.0.weight", what, 4)
    last = _need(sd, "main.9.weight", what, 4)
    return dcgan_generator_layout(first[0], first[1] // 8, last[1])
  if arch == "dcgan_discriminator":
    first = _need(sd, "main.0.weight", what, 4)
    return dcgan_discriminator_layout(first[1], first[0] // 2)
  fc = _need(sd, "fc.weight", what, 2)
  conv1 = _need(sd, "conv1.weight", what, 4)
  if arch == "wrn":
    blocks = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"block1\.layer\.(\d+)\..*", k))}
    width = _need(sd, "block1.layer.0.conv1.weight", what, 4)[0] // 16
    return wrn_layout(6 * len(blocks) + 4, max(width, 1), fc[0], conv1[1])
  return resnet50_layout(fc[0], conv1[1])


# --- the two directions ---------------------------------------------------------------

def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor (read without importing torch), copied: its
    x = x.detach().cpu()  # .numpy() shares the tensor's memory
    if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      x = x.float()
    x = np.array(x.numpy())
  return np.asarray(x)


def _to_torch_array(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  if kind == "convT":  # flipped HW, I, O -> I, O, H, W
    return np.ascontiguousarray(x[::-1, ::-1].transpose(2, 3, 0, 1))
  if kind == "dense":
    return np.ascontiguousarray(x.T)
  return x


def _from_torch_array(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if kind == "convT":  # I, O, H, W -> flipped HW, I, O
    return np.ascontiguousarray(x.transpose(2, 3, 0, 1)[::-1, ::-1])
  if kind == "dense":
    return np.ascontiguousarray(x.T)
  return x


def _compare(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]],
             what: str, optional: frozenset[str] = frozenset()) -> None:
  """One ValueError listing every missing / unexpected key and shape mismatch."""
  missing = [k for k in expected if k not in got and k not in optional]
  unexpected = [k for k in got if k not in expected]
  mismatched = [f"{k}: got {got[k]}, expected {expected[k]}"
                for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
  if not (missing or unexpected or mismatched):
    return
  parts = []
  if missing:
    parts.append(f"missing key(s) {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
  if unexpected:
    parts.append(f"unexpected key(s) {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
  if mismatched:
    parts.append("shape mismatch: " + "; ".join(mismatched[:8])
                 + (" ..." if len(mismatched) > 8 else ""))
  raise ValueError(f"{what}: " + ", ".join(parts) + ".")


def _check_flax(flat: Mapping[str, Any], layout: Layout, what: str,
                collections: tuple[str, ...] = ("params", "batch_stats")) -> None:
  """``flat`` (``'<collection>/<path>' -> array``) holds exactly the layout's
  entries of ``collections``, with their (Flax) shapes."""
  expected = {f"{e[1]}/{e[2]}": _flax_shape(e) for e in layout.values()
              if e[3] != "count" and e[1] in collections}
  _compare(expected, {k: tuple(np.shape(v)) for k, v in flat.items()}, what)


def to_torch(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
             arch: str) -> dict[str, np.ndarray]:
  """A PyTorch ``state_dict`` (``name -> np.ndarray``, in the module order of
  the reference model) from jaxrobust ``params`` and ``batch_stats``.

  Raises ``ValueError`` naming the entry when the tree is not a complete
  ``arch`` model (missing or extra parameters, e.g. an extra head, or shapes
  that do not fit the layout).
  """
  _check_arch(arch)
  flat = {f"params/{k}": _to_numpy(v) for k, v in _flat(params).items()}
  flat.update({f"batch_stats/{k}": _to_numpy(v) for k, v in _flat(batch_stats).items()})
  layout = _layout_of_flax(_flat(params), arch)
  _check_flax(flat, layout, f"to_torch(arch={arch!r})")
  out = {}
  for name, (_, collection, path, kind) in layout.items():
    if kind == "count":
      out[name] = np.zeros((), np.int64)
    else:
      out[name] = _to_torch_array(kind, flat[f"{collection}/{path}"])
  return out


def from_torch(state_dict: Mapping[str, Any], *, arch: str,
               params_template: Mapping[str, Any] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
  """jaxrobust ``(params, batch_stats)`` (nested dicts of numpy arrays) from a
  PyTorch ``state_dict`` of the reference ``arch`` model.

  ``params_template`` (e.g. the params of the model to load into, or their
  ``jax.eval_shape``): the state_dict must then give exactly its entries with
  its shapes, and the arrays take its dtypes; without it, the layout is read
  from the state_dict itself (the hyper-parameters listed above). Raises
  ``ValueError`` naming every missing, unexpected or mis-shaped key.
  """
  _check_arch(arch)
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  if sd and all(k.startswith("module.") for k in sd):  # nn.DataParallel
    sd = {k[len("module."):]: v for k, v in sd.items()}
  what = f"from_torch(arch={arch!r})"
  dtypes: dict[str, Any] = {}
  if params_template is not None:
    template = _flat(params_template)
    layout = _layout_of_flax(template, arch)
    _check_flax({f"params/{k}": v for k, v in template.items()}, layout,
                f"{what}: params_template", collections=("params",))
    dtypes = {k: getattr(v, "dtype", None) for k, v in template.items()}
  else:
    layout = _layout_of_torch(sd, arch)
  counts = frozenset(n for n, e in layout.items() if e[3] == "count")
  _compare({n: e[0] for n, e in layout.items()},
           {n: tuple(v.shape) for n, v in sd.items()}, what, optional=counts)
  params, stats = {}, {}
  for name, (_, collection, path, kind) in layout.items():
    if kind == "count":
      continue
    x = _from_torch_array(kind, sd[name])
    if collection == "params":
      params[path] = x.astype(dtypes[path]) if dtypes.get(path) is not None else x
    else:
      stats[path] = x
  return _unflat(params), _unflat(stats)


def _flax_shape(entry: tuple[tuple[int, ...], str, str, str]) -> tuple[int, ...]:
  shape, _, _, kind = entry
  if kind == "conv":
    o, i, h, w = shape
    return (h, w, i, o)
  if kind == "convT":
    i, o, h, w = shape
    return (h, w, i, o)
  if kind == "dense":
    return shape[::-1]
  return shape


# --- files ----------------------------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin")
FILE_SUFFIXES = TORCH_SUFFIXES + (".npz", ".safetensors")
# Keys under which training scripts commonly nest the state_dict in a checkpoint dict.
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2",
                       "U32": "<u4", "U64": "<u8"}


def is_state_dict_file(path: Any) -> bool:
  """Whether ``path`` names a state_dict file (by its suffix) rather than a
  jaxrobust checkpoint directory."""
  return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(FILE_SUFFIXES)


def read_state_dict(path: str | os.PathLike, *, where: str = "state_dict file"
                    ) -> dict[str, np.ndarray]:
  """``{name: np.ndarray}`` from a ``.pt``/``.pth`` (``torch.load(weights_only=True)``;
  torch is imported only for these), ``.npz`` or ``.safetensors`` file.
  Raises ``FileNotFoundError`` or ``ValueError`` naming ``where`` and the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: no file {path!r}.")
  name = path.lower()
  if name.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: np.asarray(z[k]) for k in z.files}
    except ValueError as e:  # object arrays need pickle: refused
      raise ValueError(f"{where}: {path!r} is not a plain npz of arrays ({e}).") from None
  if name.endswith(".safetensors"):
    return read_safetensors(path, where=where)
  if not name.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{where}: {path!r} is not a state_dict file (suffixes: "
                     f"{', '.join(FILE_SUFFIXES)}).")
  import torch  # only here: reading the other formats needs no torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, ...
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    raise ValueError(f"{where}: torch.load({path!r}, weights_only=True) failed: {first[:300]}. "
                     "Only state_dicts (tensors in plain containers) are read; a pickled "
                     "module or other code is refused.") from None
  return _unwrap(obj, f"{where}: {path!r}")


def _is_array(x: Any) -> bool:
  return isinstance(x, np.ndarray) or (hasattr(x, "detach") and hasattr(x, "shape"))


def _unwrap(obj: Any, what: str) -> dict[str, np.ndarray]:
  if isinstance(obj, Mapping) and obj and not all(_is_array(v) for v in obj.values()):
    nested = [k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)]
    if nested:
      obj = obj[nested[0]]
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"{what} holds a {type(obj).__name__}, not a state_dict (a mapping of "
                     "names to tensors).")
  bad = [k for k, v in obj.items() if not _is_array(v)]
  if bad:
    raise ValueError(f"{what}: entries that are not tensors: {bad[:8]}; not a state_dict.")
  return {str(k): _to_numpy(v) for k, v in obj.items()}


def read_safetensors(path: str | os.PathLike, *, where: str = "state_dict file"
                     ) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file, with numpy (BF16 widened to
  float32)."""
  with open(path, "rb") as f:
    data = f.read()
  what = f"{where}: {os.fspath(path)!r}"
  if len(data) < 8:
    raise ValueError(f"{what}: too short for a safetensors file.")
  n = int.from_bytes(data[:8], "little")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{what}: not a safetensors file (header: {e}).") from None
  buffer = memoryview(data)[8 + n:]
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if end > len(buffer) or begin > end:
      raise ValueError(f"{what}: {key!r} lies outside the file (offsets {begin}..{end}).")
    raw = buffer[begin:end]
    if dtype == "BF16":  # the upper half of a float32
      x = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype in _SAFETENSORS_DTYPES:
      x = np.frombuffer(raw, _SAFETENSORS_DTYPES[dtype])
    else:
      raise ValueError(f"{what}: {key!r} has dtype {dtype}, which is not read here.")
    if x.size != int(np.prod(shape)):
      raise ValueError(f"{what}: {key!r} has {x.size} values for shape {shape}.")
    out[key] = x.reshape(shape).astype(x.dtype.newbyteorder("="))
  return out


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
  """Writes ``{name: array}`` as a ``.safetensors`` file (keys sorted, as the
  ``safetensors`` package writes them; the header padded with spaces to a
  multiple of 8 bytes)."""
  codes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, chunks, offset = {}, [], 0
  for key in sorted(state_dict):
    x = _to_numpy(state_dict[key])  # (not ascontiguousarray: it makes scalars 1-d)
    dtype = x.dtype.newbyteorder("<") if x.dtype.byteorder not in ("|",) else x.dtype
    if np.dtype(dtype) not in codes:
      raise ValueError(f"write_safetensors: {key!r} has dtype {x.dtype}, not written.")
    raw = x.astype(dtype).tobytes()
    header[key] = {"dtype": codes[np.dtype(dtype)], "shape": list(x.shape),
                   "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
  """Writes ``{name: array}`` as ``.npz`` or ``.safetensors`` (by suffix),
  without torch."""
  name = os.fspath(path).lower()
  if name.endswith(".npz"):
    np.savez(path, **{k: _to_numpy(v) for k, v in state_dict.items()})
  elif name.endswith(".safetensors"):
    write_safetensors(path, state_dict)
  else:
    raise ValueError(f"write_state_dict: {os.fspath(path)!r}: use .npz or .safetensors (or "
                     "torch.save for .pt).")


def detect_arch(state_dict: Mapping[str, Any], *, where: str = "state_dict") -> str:
  """``'wrn'``, ``'resnet50'``, ``'vgg13'``, ``'dcgan_generator'`` or
  ``'dcgan_discriminator'`` from a state_dict's keys (a ``module.`` prefix
  allowed); ``ValueError`` naming its first keys otherwise."""
  keys = {k[len("module."):] if k.startswith("module.") else k for k in state_dict}
  if "block1.layer.0.conv1.weight" in keys:
    return "wrn"
  if "layer1.0.conv1.weight" in keys and "layer4.0.conv3.weight" in keys:
    return "resnet50"
  if "features.0.weight" in keys and "classifier.6.weight" in keys:
    return "vgg13"
  if "main.0.weight" in keys:  # Confident_classifier's _netG has main.9, _netD ends at main.8
    return "dcgan_generator" if "main.9.weight" in keys else "dcgan_discriminator"
  raise ValueError(f"{where}: not a state_dict of a known architecture ({', '.join(ARCHS)}): "
                   f"its keys are {_sample(dict.fromkeys(keys))}.")
