"""Pipeline definitions; `python -m pipelines.compile` writes full.yaml and smoke.yaml."""
