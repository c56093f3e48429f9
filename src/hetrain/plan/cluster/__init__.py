"""Hybrid-parallel plans for clusters of mixed accelerators, and the planner that chooses them."""
