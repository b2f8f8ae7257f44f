"""Datasets: preparation into Arrow token windows, memory-mapped access, the elastic sampler."""
