"""The modes of `python -m flmjax.main --mode=MODE`, the one list of them.

flmjax/main.py runs them; the launch scripts (launch/common.sh) read the names from this
file as text, one `    "name": ...` line each, so keep that layout.
"""

MODES = {
    "prepare": "reads the corpus, trains or loads the tokenizer, writes tokenized shards, "
               "prints their statistics and a decoded batch",
    "train": "trains the FLM teacher, or the baseline of --config.family; resumes from "
             "WORKDIR/checkpoints",
    "distill": "distills the FMLM student of --config.teacher_checkpoint (with "
               "--config.family=duo --config.distill.objective=dcd: Duo's DCD student), "
               "then exports its EMA weights to WORKDIR/export",
    "sample": "writes samples of --config.checkpoint to WORKDIR/samples/",
    "generate": "writes texts of --config.checkpoint for the prompts of generate.prompt or "
                "generate.prompts_file (given text, {{N}} tokens to write) as JSON lines to "
                "standard output and WORKDIR/generations.jsonl",
    "eval": "samples --config.checkpoint at each of eval.steps and scores them (gen PPL, FD, "
            "entropy) beside the dataset row, in WORKDIR/eval/",
    "score": "scores the samples of WORKDIR/eval/results.json with eval.evaluator",
    "pipeline": "prepare, train (WORKDIR/teacher), distill (WORKDIR/student) and eval "
                "(WORKDIR/eval)",
    "compare": "prepare, then train FLM (WORKDIR/teacher) and its FMLM student "
               "(WORKDIR/student), MDLM, SEDD, Duo and AR (WORKDIR/mdlm, sedd, duo, ar) on the "
               "same data and backbone and Duo's DCD student (WORKDIR/duo_dcd), and "
               "evaluate them all at eval.compare_steps (WORKDIR/eval)",
    "compile": "compiles the train step (of --config.family), and for FLM the distillation "
               "step and the one-step sampler (for Duo with distill.objective=dcd, the DCD "
               "step), for --config.topology and prints memory and FLOPs per chip",
}
