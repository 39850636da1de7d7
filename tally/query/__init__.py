"""Reading back what was ingested: event and log search with keyset pages, and stats from counter windows."""
