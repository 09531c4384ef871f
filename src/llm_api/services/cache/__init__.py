"""Response cache: deterministic requests answered from Redis or an in-process LRU."""
