"""Where data lands: PostgreSQL, the counter topic, Redis, Stripe, Slack.

Every sink follows one contract (see `sinks.base`): write a batch, flush, and only then may the
processor commit offsets.
"""
