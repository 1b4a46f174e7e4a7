"""GPU benchmarks of qlora-sft against the notebook recipe: `python -m bench.run`, `python -m bench.distributed`."""
