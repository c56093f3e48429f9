"""The single-node offload plan, and the planner that chooses it."""
