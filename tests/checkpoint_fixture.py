"""A checkpoint written by the code before the builder / trainer / stage-task
split (``tests/fixtures/checkpoint_v0``), for ``tests/test_refactor_fixtures.py``:
the tiny config below trained 4 of 8 steps (a checkpoint at step 4 with its
data-iterator position), and the parameters and results the uninterrupted
8-step run ended with (``final.npz``, ``results.json``).

``python -m tests.checkpoint_fixture DATA_DIR`` rewrites it (only when the
checkpoint format changes on purpose). ``python -m tests.checkpoint_fixture
DATA_DIR --expected`` keeps the step-4 checkpoint and the final parameters and
rewrites the final BatchNorm statistics and results from a resume with
today's code -- after an intended change of what BatchNorm keeps (the switch
to PyTorch's unbiased running variance, issue 18); it refuses if the final
parameters moved.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoint_v0")


def config(data_dir):
  from tests.tiny_config import tiny_config
  c = tiny_config(data_dir, steps=8)
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 3
  c.plots = False
  c.async_checkpointing = False
  return c


def main(data_dir: str) -> None:
  import tempfile

  import numpy as np

  from jaxrobust import stages
  from jaxrobust.checkpoint import load_pretrained
  from jaxrobust.modules import flat
  work = tempfile.mkdtemp()
  results = stages.run(config(data_dir), work)
  params, stats = load_pretrained(work, 8)
  shutil.rmtree(FIXTURE, ignore_errors=True)
  os.makedirs(FIXTURE)
  shutil.copytree(os.path.join(work, "checkpoints", "4"), os.path.join(FIXTURE, "checkpoints", "4"))
  np.savez(os.path.join(FIXTURE, "final.npz"),
           **{f"params/{k}": v for k, v in flat(params).items()},
           **{f"batch_stats/{k}": v for k, v in flat(stats).items()})
  keep = {k: v for k, v in results.items() if "seconds" not in k and "per_second" not in k}
  with open(os.path.join(FIXTURE, "results.json"), "w", encoding="utf-8") as f:
    json.dump(keep, f, indent=1, sort_keys=True)
  shutil.rmtree(work)
  print(f"wrote {FIXTURE}")


def refresh_expected(data_dir: str) -> None:
  import tempfile

  import numpy as np

  from jaxrobust import stages
  from jaxrobust.checkpoint import load_pretrained
  from jaxrobust.modules import flat
  work = tempfile.mkdtemp()
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), os.path.join(work, "checkpoints"))
  results = stages.run(config(data_dir), work)
  params, stats = load_pretrained(work, 8)
  old = np.load(os.path.join(FIXTURE, "final.npz"))
  for k, v in flat(params).items():
    np.testing.assert_allclose(v, old[f"params/{k}"], rtol=1e-5, atol=1e-6, err_msg=k)
  arrays = {k: old[k] for k in old.files if k.startswith("params/")}
  arrays.update({f"batch_stats/{k}": v for k, v in flat(stats).items()})
  np.savez(os.path.join(FIXTURE, "final.npz"), **arrays)
  keep = {k: v for k, v in results.items() if "seconds" not in k and "per_second" not in k}
  with open(os.path.join(FIXTURE, "results.json"), "w", encoding="utf-8") as f:
    json.dump(keep, f, indent=1, sort_keys=True)
  shutil.rmtree(work)
  print(f"refreshed the expected BatchNorm statistics and results in {FIXTURE}")


if __name__ == "__main__":
  if "--expected" in sys.argv[2:]:
    refresh_expected(sys.argv[1])
  else:
    main(sys.argv[1])
