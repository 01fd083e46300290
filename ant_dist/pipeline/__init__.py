"""Running the stages for a user: the reproduction plan and its runner, and the `accelerate launch` command."""
