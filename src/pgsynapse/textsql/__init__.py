"""Questions about the data: text-to-SQL, executed safely (issue 19)."""
