"""A run's reported classification results recomputed from what it saved: its
final checkpoint, predicted again over a split in numpy (float64)."""

import numpy as np

from jaxrobust import artifacts as artifacts_lib
from jaxrobust import tasks


def classification(config, workdir, split: str = "test", *, temperature: float = 1.0
                   ) -> dict[str, float]:
  """``{'accuracy', 'nll', 'num_examples'}`` of the final checkpoint in
  ``workdir`` (a run's or a stage's directory) on ``config``'s dataset, its
  logits divided by ``temperature``."""
  ctx = tasks.StageContext("recompute", str(workdir), config,
                           artifacts_lib.Artifacts(None, [], None))
  out = tasks.predict_outputs(ctx, checkpoint=str(workdir), split=split,
                              fields=("logits", "label"))
  z = np.asarray(out["logits"], np.float64) / temperature
  labels = np.asarray(out["label"])
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return {"accuracy": float(np.mean(z.argmax(-1) == labels)),
          "nll": float(-logp[np.arange(len(labels)), labels].mean()),
          "num_examples": float(len(labels))}
