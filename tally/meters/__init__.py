"""Meters: what to count and how: definitions, windows, and the aggregations with their SQL."""
