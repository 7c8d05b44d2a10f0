"""Benchmarks: `python -m bench.<name> --help`. Each prints its figures; docs/measurements.md records them."""
