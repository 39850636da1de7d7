"""Wire contracts shared by every component: event envelope, topics, counters, dead letters."""
