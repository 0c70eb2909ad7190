"""The serving container's start, one job a module; docker/entrypoint.py runs them in order:
settings (the environment, checked), archive (get the model archive and check it), run_config (the
config.properties TorchServe runs with), java (TorchServe's command line and environment), supervisor (TorchServe
as PID 1's child, and the stop signals), readiness (until a prediction is answered), report (what it tells)."""
