import sys
from absl import app
from flmjax import bench, objectives, state, sharding
from flmjax.models import dit
def main(argv):
  config = bench._CONFIG.value
  V = bench._VOCAB.value
  build = dit.builder(config.model, V)
  layout = state.plan(config, build, sharding.make_mesh(config.mesh))
  compiled = state.compile_step(layout, objectives.denoising(config, V), config)
  open("/tmp/step.hlo", "w").write(compiled.as_text())
app.run(main)
