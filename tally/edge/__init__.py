"""The HTTP edge every product shares: problem+json, answers, body reading and product-route wiring.

Products (query, usage, alerts) and the gateway import this; it imports none of them (ADR 121).
"""
