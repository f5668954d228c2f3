"""Span semantics: what a span or a record means (audit record or not, effect, data store,
outcome, actor, resource), decided once for the processor, serve, policy and review.
"""
