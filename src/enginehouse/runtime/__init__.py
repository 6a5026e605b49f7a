"""Execution instances and their threads."""
