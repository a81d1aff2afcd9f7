"""XLA flags that jaxrobust sets for CPU runs (no jax import: flags must be in
``XLA_FLAGS`` before jax is imported).

XLA:CPU (jaxlib 0.10.2) lowers convolutions to YNNPACK by default, whose weight
gradient (a skinny GEMM over batch x height x width) is slow; Eigen's is about
2x faster, and a WRN-40-2 train step gets about 2.2x faster
(benchmarks/README.md). The flag only affects the CPU backend.
"""

#: The XLA flag that makes the CPU backend compute convolutions with Eigen.
CPU_CONV_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def with_cpu_conv_tuning(xla_flags: str) -> str:
  """``xla_flags`` plus :data:`CPU_CONV_XLA_FLAG`, unless the user set that option."""
  if "xla_cpu_experimental_ynn_fusion_type" in xla_flags:
    return xla_flags
  return f"{xla_flags} {CPU_CONV_XLA_FLAG}".strip()
