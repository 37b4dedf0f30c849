"""Evaluation: workloads (traces, synthetic), virtual-time simulation with the real controller in
the loop, baseline policies, capacity search and reports."""
