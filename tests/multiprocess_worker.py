"""One process of tests/test_multiprocess.py: trains the shrunk tiny config on a mesh
spanning every process, then process 0 writes the final params and EMA to WORKDIR/final.npz.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES DATA_DIR WORKDIR STEPS
"""

import os
import sys

from conftest import train_config  # sets XLA_FLAGS for the test process; replaced below

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
data_dir, workdir, steps = sys.argv[5], sys.argv[6], int(sys.argv[7])
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices}"
                           " --xla_backend_optimization_level=1"
                           " --xla_cpu_use_fusion_emitters=false")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=wrong-import-position
from jax.experimental import multihost_utils  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)

from flmjax import train  # pylint: disable=wrong-import-position

config = train_config(steps=steps, checkpoint_every=2, keep_checkpoints=5)
config.data.dir = data_dir
config.mesh.update(data=4, fsdp=2)
state = train.train(config, workdir)
final = multihost_utils.process_allgather({"params": state["params"], "ema": state["ema"]},
                                          tiled=True)
if jax.process_index() == 0:
  np.savez(os.path.join(workdir, "final.npz"), **{
      jax.tree_util.keystr(path): np.asarray(x)
      for path, x in jax.tree_util.tree_leaves_with_path(final)})
