"""flmjax: Flow Language Models (FLM) and one-step Flow Map Language Models (FMLM) in JAX."""
