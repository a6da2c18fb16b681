"""The study: its trainer (train), configuration (study_config) and the checks every command
shares (config_checks, cli), a run's workdir, console, stop signal and TensorBoard files,
and the evaluation of reference checkpoints (evaluate_reference)."""
