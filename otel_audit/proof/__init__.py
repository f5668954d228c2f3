"""Proof: hash chain, Merkle tree, signing keys, verification and evidence bundles."""
