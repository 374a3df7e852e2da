"""Benchmarks: programs that measure ew beside the tool a user would pick instead."""
