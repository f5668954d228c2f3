"""Capture: audit actions, the action scope in the context, the sampler and the span processor.

The only part that runs on the application's threads. Data flow and rules: docs/design.md.
"""
