"""The server side: federation inventory, stages, planning, the request record, evaluation,
results, and the orchestration of a run (experiment)."""
