"""The network layer of a probe: timed TCP connections over routes (dial), proxies, and TLS."""
