"""Benchmarks (GPU): the training step against its peers (train_throughput.py) and the fused
kernels against the PyTorch paths they replace (bench_<op>.py, one per ti_fast/kernels/<op>.py).
Run as modules from the repository root, e.g. `python -m bench.bench_geglu`."""
