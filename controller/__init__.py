"""The throttllem sidecar controller, its command line and its evaluation tools."""
