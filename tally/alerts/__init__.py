"""Alert rules on sliding windows of counters: the evaluator (`tally alerts`), the lifecycle, delivery and the API."""
