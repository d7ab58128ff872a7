"""vLLM glue: scheduler, model runner, worker, request admission."""
