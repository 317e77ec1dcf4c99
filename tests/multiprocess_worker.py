"""One process of tests/test_multiprocess.py: trains the shrunk tiny config on a mesh
spanning every process (conftest.mesh_config).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES DATA_DIR WORKDIR STEPS
"""

import os
import sys

# conftest sets XLA_FLAGS for the test process; replaced below
from conftest import COMPILE_FLAGS, mesh_config

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
data_dir, workdir, steps = sys.argv[5], sys.argv[6], int(sys.argv[7])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + COMPILE_FLAGS
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=wrong-import-position

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                           num_processes=num_processes, process_id=process_id)

from flmjax import train  # pylint: disable=wrong-import-position
from flmjax.errors import STOPPED_STATUS, Stopped  # pylint: disable=wrong-import-position

try:
  train.train(mesh_config(steps, data_dir), workdir)
except Stopped:  # saved on SIGTERM, as python -m flmjax.main ends
  sys.exit(STOPPED_STATUS)
