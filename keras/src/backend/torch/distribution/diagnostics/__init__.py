"""What a distribution did and will cost: the layout report after the first
step (`layout_report`), the replica check, and `describe`/`plan`, which
also plan meshes larger than the machine: each rank's weights, gradients
and optimizer state (`state_bytes`) and a training step simulated on fake
tensors (`step_plan`)."""
