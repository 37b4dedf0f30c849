"""Instance scaling: engine sizes inside a node (Triton) and replicas across a cluster (KEDA)."""
