"""Real registry fixtures (Debian's docker-registry on loopback). Filled in by the registry-client work."""
