"""Every test runs on a simulated 8-device CPU mesh."""

import os

# On a loaded 2-core machine one of the 8 simulated devices' threads can reach
# a collective more than XLA's default 40 s after the others, and XLA then
# aborts the process; give slow rendezvous time instead.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    " --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA flag)

assert jax.device_count() == 8, jax.devices()
