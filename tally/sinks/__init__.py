"""Where data lands: PostgreSQL, the counter and dead-letter topics, Redis.

Every sink follows one contract (see `tally.sinks.base`): write a batch, flush, and only then may the
processor commit offsets.
"""
