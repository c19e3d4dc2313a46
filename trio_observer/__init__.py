"""Supervise child processes in Trio and observe what they do."""
