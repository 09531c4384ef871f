"""Usage records and the conversation log, written through a durable local buffer."""
