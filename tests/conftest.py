"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, a shared compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
