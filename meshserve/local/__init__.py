"""Running the whole mesh on one machine: up, demo, worker processes."""
