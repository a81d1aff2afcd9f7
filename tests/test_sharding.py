"""Mesh and sharding rules from config data."""

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxrobust import sharding


def test_mesh_fills_minus_one_and_validates():
  mesh = sharding.make_mesh((("data", -1),))
  assert mesh.shape == {"data": 8}
  mesh = sharding.make_mesh((("data", 2), ("fsdp", -1)))
  assert mesh.shape == {"data": 2, "fsdp": 4}
  with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
    sharding.make_mesh((("data", 16),))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh((("a", -1), ("b", -1)))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh((("a", 3), ("b", -1)))


def test_rules_by_regex_first_match_wins():
  mesh = sharding.make_mesh((("data", -1),))
  tree = {"conv": {"kernel": jnp.zeros((3, 3, 16, 64)), "bias": jnp.zeros(64)},
          "head": {"kernel": jnp.zeros((64, 10))}, "step": jnp.zeros((), jnp.int32)}
  sh = sharding.tree_shardings(tree, mesh, ((r"head/", "replicate"),
                                            (r"kernel$", "fsdp(axis='data', min_size=0)")))
  assert sh["conv"]["kernel"].spec == P(None, None, None, "data")  # largest divisible dim
  assert sh["head"]["kernel"].spec == P()
  assert sh["conv"]["bias"].spec == P()
  assert sh["step"].spec == P()


def test_fsdp_min_size_and_indivisible_dims_stay_replicated():
  mesh = sharding.make_mesh((("data", -1),))
  tree = {"small": jnp.zeros((8, 8)), "odd": jnp.zeros((3, 5, 7))}
  sh = sharding.tree_shardings(tree, mesh, ((".*", "fsdp(min_size=100)"),))
  assert sh["small"].spec == P() and sh["odd"].spec == P()


def test_bad_rules_are_named():
  with pytest.raises(ValueError, match="unknown sharding rule 'fsdpp'"):
    sharding.parse_rule("fsdpp")
  with pytest.raises(ValueError, match="not of the form"):
    sharding.parse_rule("fsdp(axis=)")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['axes'\]"):
    sharding.parse_rule("fsdp(axes='data')")
  assert sharding.parse_rule("fsdp('data', 0)")((16, 8), sharding.make_mesh((("data", -1),))) == P(
      "data", None)
  mesh = sharding.make_mesh((("data", -1),))
  with pytest.raises(ValueError, match="axis 'model' is not in the mesh"):
    sharding.tree_shardings({"w": jnp.zeros((8, 8))}, mesh, ((".*", "fsdp(axis='model')"),))
  with pytest.raises(ValueError, match="data_axes"):
    sharding.data_sharding(mesh, ("batch",))
