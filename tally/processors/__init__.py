"""Kafka consumer loops: batch, dedup, count, dead-letter, persist, and only then commit offsets."""
