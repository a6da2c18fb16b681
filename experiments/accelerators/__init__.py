"""Accelerators: the Pallas kernels compiled offline for NVIDIA targets, and the day-one check
on a lent GPU."""
