"""Usage metering: plans, subscriptions, billing periods, usage reads and the hard-limit decision."""
