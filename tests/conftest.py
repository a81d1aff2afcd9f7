"""Test setup: 8 host CPU devices so sharding is exercised on a laptop/CI.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of the
conftest (pytest imports it before any test module).
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache per test run, shared by the xdist
# workers: the many tiny runs compile the same evaluation and step programs
# (same model, same shapes) in different tests and stages. Removed at the end
# of the run (pytest_sessionfinish), so every run starts cold, as CI does.
# xdist workers inherit the controller's environment, hence its run id.
os.environ.setdefault("JAXROBUST_TEST_RUN", str(os.getpid()))
# The run's temporary files go under one directory of its own, also removed
# at the end: tfds makes an empty temporary directory (and never removes it)
# every time it builds a builder for a dataset not prepared in its data_dir,
# which the tests do hundreds of times. pytest's own tmp_path directories stay
# where pytest keeps (and prunes) them.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
RUN_TMP = os.environ.setdefault(
    "JAXROBUST_TEST_TMP", os.path.join(tempfile.gettempdir(),
                                       f"jaxrobust-tests-{os.environ['JAXROBUST_TEST_RUN']}"))
os.makedirs(RUN_TMP, exist_ok=True)
os.environ["TMPDIR"] = tempfile.tempdir = RUN_TMP
JAX_CACHE = os.path.join(RUN_TMP, "xla-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tfds data_dir shared by the tests of one worker; embedded datasets are
  prepared into it on first use."""
  return tmp_path_factory.mktemp("tfds")


def pytest_sessionfinish(session, exitstatus):
  """The controller (not an xdist worker) removes the run's temporary
  directory and compilation cache."""
  del exitstatus
  if not hasattr(session.config, "workerinput"):
    shutil.rmtree(RUN_TMP, ignore_errors=True)
