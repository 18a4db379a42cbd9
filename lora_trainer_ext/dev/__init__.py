"""Developer-only code: benchmarks (`python -m lora_trainer_ext bench ...`) and random-weight
checkpoints for tests and benchmarks. The runtime (tab, API, WebUI, training) never imports it.
"""
