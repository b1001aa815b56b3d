"""Sweep specs shipped with the package; copy one and edit it."""
