"""The floor every other package stands on: errors, atomic file writes, the output guard, device choice.

Imports nothing from the rest of `compress` (see docs/design.md, "Floors").
"""
