"""Scheduling requests onto instances."""
