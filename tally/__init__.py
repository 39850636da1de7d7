"""Wiring for Tally: settings and the `tally` command line. It wires; it does not decide."""
