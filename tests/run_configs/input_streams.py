"""Training streams with every kind of hook, for the per-process input tests:
shuffled digits with corrupted labels, a class-balanced stream over an
imbalanced index with class weights, a sequential stream over a per-class
subset. Batch sizes are chosen so epochs do not end on a batch boundary."""

from configs import default


def get_config(arg=None):
  del arg
  c = default.get_config("smoke")
  c.evaluators.ood.sets = {}
  c.streams.train.batch_size = 48
  c.streams.train.labels = "corrupted(kind='uniform', strength=0.4)"
  c.streams.balanced = {"data": "digits", "split": "train", "batch_size": 24,
                        "index": "imbalanced(ratio=5.0)", "sampler": "class_balanced",
                        "labels": "class_weighted"}
  c.streams.few = {"data": "digits", "split": "validation", "batch_size": 16,
                   "index": "per_class(num_per_class=7)", "sampler": "sequential"}
  return c
