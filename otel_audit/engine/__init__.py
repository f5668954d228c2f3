"""Records and the commit engine: canonical record bytes, the writer (group commit,
checkpoints) and the ledger backends it appends to.
"""
