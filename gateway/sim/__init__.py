"""A vLLM simulator for development, tests and load tests without a GPU."""
