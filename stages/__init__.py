"""Pipeline stages: one module per DAG node, each a pure core plus a thin `run(ctx)`."""
