"""Billing: the jobs worker, Stripe usage reporting, period close and reconciliation."""
