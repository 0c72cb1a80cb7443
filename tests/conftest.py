"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, a shared compile cache.

Compilation dominates this suite's time on a 2-core machine: many tests build the same tiny train
step, so a persistent compilation cache and XLA's lowest CPU optimisation level keep CI short.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vlpjax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
