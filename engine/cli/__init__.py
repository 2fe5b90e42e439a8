"""The tools: ``python -m engine COMMAND`` (demo, bench, drill, loadtest, fuzz, cluster)."""
