"""Benchmark of the scaling policy against KEDA/HPA, Judoscale-style and HireFire-style autoscalers."""
