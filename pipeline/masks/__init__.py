"""Stage 1b, plan -> masks: segmenters, the masks/ folder format, and readers of other mask layouts."""
