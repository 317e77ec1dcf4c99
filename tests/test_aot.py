"""--mode=compile: the steps and the sampler compiled for a TPU slice or GPUs this machine
lacks."""

import importlib.util
import json

import jax
import pytest

from conftest import train_config
from flmjax import aot
from flmjax.errors import UsageError
from flmjax.models import dit

CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_cuda{version}_plugin") is not None
                  for version in (12, 13))


@pytest.fixture(autouse=True)
def _no_compilation_cache():
  """Executables compiled for a slice without its client cannot be read back from the
  suite's compilation cache (JAX warns and compiles again), so these tests skip it (the
  command line does the same: tests/test_main.py)."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", enabled)


def _config(**mesh):
  config = train_config()
  config.model.update(width=128, depth=1, heads=2, dtype="bfloat16")
  config.data.seq_len = 64
  config.batch_size = 16
  config.sample.num_samples = 4
  config.topology = "v5e:2x2"
  config.mesh.update(mesh)
  return config


@pytest.mark.slow
def test_compiles_for_a_v5e_slice_and_reports_memory_flops_and_what_does_not_fit(
    tmp_path):
  pytest.importorskip("libtpu", reason='needs libtpu: pip install -e ".[tpu]"')
  config = _config(data=4)
  report = aot.compile_mode(config, str(tmp_path))
  assert (report["topology"], report["chips"], report["device_kind"]) == (
      "v5e:2x2", 4, "TPU v5 lite")
  assert [c["computation"] for c in report["computations"]] == [
      "train step", "validation", "distill step", "one-step sampler"]
  assert json.loads((tmp_path / "compile.json").read_text()) == json.loads(json.dumps(report))
  step = report["computations"][0]
  assert 0 < step["bytes_per_chip"] < 16 * 2**30 and 0 < step["hbm_fraction"] < 1
  # XLA's count against the model's matmuls (3 x forward), shared by 4 chips; XLA also
  # counts the noise draw, norms and softmaxes, so it is somewhat larger.
  model = dit.training_flops_per_token(config.model, 512, 64) * 16 * 64 / 4
  assert step["model_flops_per_chip"] == pytest.approx(model)
  assert step["model_compute_seconds"] == pytest.approx(model / 197e12)
  assert 1.0 <= step["flops_per_chip"] / model <= 1.6
  # the fused output head is a loop over chunks: XLA counts one
  assert step["cost_undercounted"] and "model_flops_per_chip" not in report["computations"][2]
  # At least the parameters, EMA and Adam moments are read once (their bytes on a chip).
  assert step["bytes_accessed_per_chip"] > step["argument_bytes"] / 2
  assert step["roofline_seconds"] == pytest.approx(max(
      step["flops_per_chip"] / 197e12, step["bytes_accessed_per_chip"] / 819e9))
  assert step["bound"] in ("compute", "memory")
  sampler = report["computations"][3]

  # At L 128, attention=auto takes the splash kernel (soft cap inside) on the slice, in the
  # validation too (lowered under the mesh: a TPU kernel cannot be partitioned by XLA);
  # with fsdp 4 the sampler's weights are split 4 ways; a step too large for the chip is
  # reported, not raised.
  config = _config(data=1, fsdp=4)
  config.data.seq_len, config.batch_size = 128, 2**18
  report = aot.compile_mode(config, str(tmp_path / "large"))
  assert report["attention"] == "splash"
  assert "RESOURCE_EXHAUSTED" in report["computations"][0]["error"]
  assert report["computations"][1]["attention"] == "splash"
  assert report["computations"][3]["argument_bytes"] < 0.4 * sampler["argument_bytes"]


@pytest.mark.skipif(CUDA_PLUGIN, reason="JAX's CUDA plugin is installed")
def test_a_gpu_topology_without_jaxs_cuda_plugin_says_what_to_install():
  with pytest.raises(UsageError, match=r"topology='h100:8' could not be described .*"
                     r"pip install \"jax\[cuda12-local\]=="):
    aot.target_devices("h100:8")


@pytest.mark.parametrize("topology", ["h200:eight", "h200:", "h200:x8", "h200:8x", "h200:0",
                                      "h200:0x8"])
def test_a_malformed_gpu_topology_is_refused(topology):
  with pytest.raises(UsageError, match=f"topology='{topology}': write h200, h200:GPUS or "
                     "h200:HOSTSxGPUS with positive counts"):
    aot.target_devices(topology)


@pytest.mark.skipif(not CUDA_PLUGIN,
                    reason='needs JAX\'s CUDA plugin: pip install "jax[cuda12-local]"')
def test_compiles_for_gpus_without_one_with_the_flash_kernel(tmp_path):
  """Two hosts of two H100s described to XLA (no GPU here): the memory plan per GPU against
  its 80 GiB; XLA gives no cost analysis without the device, so no FLOPs or roofline."""
  config = _config(data=4)
  config.topology, config.model.attention = "h100:2x2", "flash"
  report = aot.compile_mode(config, str(tmp_path))
  assert (report["chips"], report["device_kind"], report["attention"]) == (
      4, "NVIDIA H100 80GB HBM3", "flash")
  for computation in report["computations"]:
    assert computation["hbm_fraction"] == pytest.approx(
        computation["bytes_per_chip"] / (80 * 2**30))
    assert 0 < computation["hbm_fraction"] < 0.01
    assert "flops_per_chip" not in computation and "roofline_seconds" not in computation


@pytest.mark.slow
def test_a_duo_run_compiles_its_dcd_step():
  """For the local devices: family=duo with distill.objective=dcd compiles the train step
  (with Duo's curriculum) and the DCD step (its state holding the round's teacher)."""
  config = train_config()
  config.family, config.distill.objective = "duo", "dcd"
  config.duo.curriculum_end = 2
  names = [c["computation"] for c in aot.compile_all(config)["computations"]]
  assert names == ["train step", "validation", "distill step"]


def test_v_is_read_from_the_tokenizer_file_a_run_would_read(prepared):
  """A SentencePiece tokenizer.path gives the V of its file, as training reads it (here
  the model flmjax trained for the prepared corpus), whatever tokenizer.vocab_size says;
  without a path, the model the run would train has tokenizer.vocab_size."""
  config = train_config()
  config.tokenizer.vocab_size = 1000
  assert aot.vocab_size(config) == 1000
  config.tokenizer.path = prepared.tokenizer.source
  assert aot.vocab_size(config) == prepared.tokenizer.vocab_size == 512


@pytest.mark.slow
def test_model_flops_count_each_network_pass_and_each_step_names_its_attention(tmp_path):
  """For the local devices: D3PM's step also reads the clean sequence, so its model FLOPs
  are twice MDLM's, as XLA counts them; AR's step has no soft cap, so attention=auto takes
  the fused kernel where the config's soft cap would take the plain path."""
  steps = {}
  for family in ("mdlm", "d3pm"):
    config = train_config()
    config.family = family
    steps[family] = aot.compile_all(config)["computations"][0]
  assert steps["d3pm"]["model_flops_per_chip"] == 2 * steps["mdlm"]["model_flops_per_chip"]
  assert 1.8 <= steps["d3pm"]["flops_per_chip"] / steps["mdlm"]["flops_per_chip"] <= 2.2
  config = train_config()
  config.family, config.model.attention = "ar", "auto"
  assert dit.attention_path("auto", config.model.attn_softcap, config.data.seq_len,
                            config.model.width // config.model.heads) == "plain"
  report = aot.compile_mode(config, str(tmp_path))
  assert report["attention"] == report["computations"][0]["attention"] == "fused"
