"""evolver: the muNet search (mutations, parent selection, scoring, candidate training,
survival, locking), the worker process that claims tasks and commits winners, and the
fine-tuning baselines used by benchmarks."""
