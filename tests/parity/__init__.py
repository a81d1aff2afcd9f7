"""The step-for-step parity tier: PyTorch/numpy ports of the reference
repositories' training steps run side by side with jaxrobust's own step
(``python -m pytest -n 0 -m parity tests/parity``; needs ``pip install -e
".[torch]"``, and skips without torch)."""
