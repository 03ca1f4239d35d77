"""Training: the Seg-Mix LoRA and Infusion trainers (pure torch; the child process of the training
nodes, see DESIGN.md "Training sidecar")."""
