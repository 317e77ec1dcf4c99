import sys, time, jax, jax.numpy as jnp
from flmjax import flow, bench
from configs import tiny
head = sys.argv[1]; V = int(sys.argv[2]); B = int(sys.argv[3])
config = tiny.get_config()
config.data.seq_len = 128; config.batch_size = B; config.noise = "latent"; config.model.output_head = head
if len(sys.argv) > 4: config.model.dtype = sys.argv[4]
t, _ = bench._time_train(config, V, 7, "")
print(head, V, B, config.model.dtype, round(t["step_seconds"], 4), round(t["tokens_per_second"]), t["planned_bytes"] // 2**20, "MiB")
