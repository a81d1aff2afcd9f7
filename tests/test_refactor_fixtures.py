"""Behaviour held across the split of the engine (issue 17): every shipped
config resolves to what it resolved to before, and a checkpoint written
before loads, resumes and ends where the uninterrupted run of the old code
ended."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest

from tests import checkpoint_fixture, config_snapshot


@pytest.mark.parametrize("path, arg", config_snapshot.SNAPSHOT_ARGS,
                         ids=[f"{p.rsplit('/', 1)[1]}:{a}" for p, a in config_snapshot.SNAPSHOT_ARGS])
def test_resolved_configs_unchanged(path, arg):
  with gzip.open(config_snapshot.FIXTURE, "rt", encoding="utf-8") as f:
    before = json.load(f)[f"{path}:{arg}"]
  assert config_snapshot.resolve(path, arg) == before


@pytest.mark.slow
def test_old_checkpoint_loads_and_resumes_to_the_old_result(tmp_path, data_dir):
  from jaxrobust import stages
  from jaxrobust.checkpoint import load_pretrained
  from jaxrobust.modules import flat
  work = tmp_path / "run"
  shutil.copytree(os.path.join(checkpoint_fixture.FIXTURE, "checkpoints"), work / "checkpoints")
  params4, _ = load_pretrained(str(work), 4)  # init_from's reader
  assert flat(params4)
  results = stages.run(checkpoint_fixture.config(data_dir), str(work))
  with open(os.path.join(checkpoint_fixture.FIXTURE, "results.json"), encoding="utf-8") as f:
    expected = json.load(f)
  for k, v in expected.items():
    assert results[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  params, stats = load_pretrained(str(work), 8)
  final = np.load(os.path.join(checkpoint_fixture.FIXTURE, "final.npz"))
  got = {**{f"params/{k}": v for k, v in flat(params).items()},
         **{f"batch_stats/{k}": v for k, v in flat(stats).items()}}
  assert sorted(got) == sorted(final.files)
  for k in final.files:
    np.testing.assert_allclose(got[k], final[k], rtol=1e-5, atol=1e-6, err_msg=k)
