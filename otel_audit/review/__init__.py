"""Review: trails and the views reviewers read (search, exports)."""
