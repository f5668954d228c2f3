"""Policy: what is kept, at which level and durability; redaction; the data boundary."""
