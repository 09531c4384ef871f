"""Routing one model id over several deployments: strategies, retries, circuit breakers."""
