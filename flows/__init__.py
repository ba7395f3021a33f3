"""Prefect flows of the wanlite DAG: `steps` (one flow per step), `distill` (the orchestrator), `bootstrap`."""
