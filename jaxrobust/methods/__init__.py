"""The papers' methods, one module each, registering their hooks on import.

Nothing imports these modules by name: a registry that is asked for a name it
does not hold imports every module of this package and looks again
(:func:`jaxrobust.registry.load_methods`). A new method is a new module here;
it registers loss terms, scores, perturbations, samplers, label sources and
stage tasks with the registries' ``register`` decorators and writes its stage
tasks on :mod:`jaxrobust.tasks`.
"""
