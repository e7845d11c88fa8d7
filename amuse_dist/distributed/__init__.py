"""Distributed plumbing: parameter layouts, owner assignment, owner-wise Newton-Schulz."""
