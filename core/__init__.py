"""What stages and the orchestrator share: errors, typed config, artifact store, stage context, model loading."""
