"""Benchmarks of Simba against Adam, SGD, Muon and Sophia on the paper's problems."""
