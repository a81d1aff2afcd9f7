"""The papers' methods, one module each, registering their hooks on import.

Importing this package imports every method module, so the trainer and the
stage runner (which import this package, never a method by name) see every
registered loss term, score, perturbation, sampler, label source and stage
task. A new method is a new module here plus one line below.
"""

from jaxrobust.methods import adversarial  # noqa: F401
from jaxrobust.methods import domain_adaptive  # noqa: F401
from jaxrobust.methods import energy  # noqa: F401
from jaxrobust.methods import imbalance  # noqa: F401
from jaxrobust.methods import label_noise  # noqa: F401
from jaxrobust.methods import mahalanobis  # noqa: F401
from jaxrobust.methods import noisy_student  # noqa: F401
from jaxrobust.methods import odin  # noqa: F401
from jaxrobust.methods import outlier_exposure  # noqa: F401
from jaxrobust.methods import self_training  # noqa: F401
from jaxrobust.methods import simclr  # noqa: F401
from jaxrobust.methods import transfer  # noqa: F401
from jaxrobust.methods import tuning  # noqa: F401
