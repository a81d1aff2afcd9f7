"""The one Registry: spec parsing, argument checks against signatures,
presets, suggestions."""

import pytest

from jaxrobust.registry import Registry, RegistryError, parse_spec, suggest


def _registry():
  r = Registry("widget")

  @r.register("scale")
  def scale(x, factor=1.0, *, offset=0.0):
    return x * factor + offset

  @r.register("double", factor=2.0)
  @r.register("needs")
  def needs(x, factor):
    return x * factor

  return r


@pytest.mark.parametrize("text, name, args, kwargs", [
    ("flip", "flip", (), {}),
    ("pad_crop(4)", "pad_crop", (4,), {}),
    ("fgsm(eps=8/255)", "fgsm", (), {"eps": 8 / 255}),
    ("pgd(eps=2**-5, steps=10, norm='l2')", "pgd", (), {"eps": 2**-5, "steps": 10, "norm": "l2"}),
    ("subset(indices='artifact:a/b')", "subset", (), {"indices": "artifact:a/b"}),
    ("w(weights=(1, -2.5, 3))", "w", (), {"weights": (1, -2.5, 3)}),
    ({"name": "energy", "temperature": 2.0}, "energy", (), {"temperature": 2.0}),
])
def test_parse_spec(text, name, args, kwargs):
  spec = parse_spec(text)
  assert (spec.name, spec.args, dict(spec.kwargs)) == (name, args, kwargs)


@pytest.mark.parametrize("bad", ["a(", "a(b)", "a(**k)", "1+2", "", "a(x=foo())"])
def test_bad_specs_are_errors(bad):
  with pytest.raises(RegistryError):
    parse_spec(bad)


def test_build_binds_and_checks_arguments():
  r = _registry()
  assert r.build("scale(3)", runtime=("x",))(2) == 6
  assert r.build("scale(factor=3, offset=1)", runtime=("x",))(2) == 7
  assert r.build("double", runtime=("x",))(5) == 10
  with pytest.raises(RegistryError, match=r"cfg.k: widget 'scale' got unknown option\(s\) "
                                          r"\['ofset'\] \(did you mean 'offset'"):
    r.build("scale(ofset=1)", where="cfg.k", runtime=("x",))
  with pytest.raises(RegistryError, match="takes at most 2"):
    r.build("scale(1, 2, 3)", runtime=("x",))
  with pytest.raises(RegistryError, match=r"needs \['factor'\]"):
    r.build("needs", runtime=("x",))
  with pytest.raises(RegistryError, match=r"'double' fixes \['factor'\]"):
    r.build("double(factor=3)", runtime=("x",))
  with pytest.raises(RegistryError, match=r"unknown widget 'scal' \(did you mean 'scale'"):
    r.build("scal", runtime=("x",))
  with pytest.raises(RegistryError, match="already registered"):
    r.register("scale")(lambda x: x)


def test_suggest():
  assert suggest("optimiser", ["optimizer", "model"]) == " (did you mean 'optimizer'?)"
  assert suggest("zzz", ["optimizer"]) == ""
