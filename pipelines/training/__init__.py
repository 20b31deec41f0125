"""Training a configuration: the device and precision, the loop, its divergence checks, and pre-flight."""
