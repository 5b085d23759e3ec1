"""One router per concern: embeddings, rank, models and health, metrics."""
