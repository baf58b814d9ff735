"""Stage 1a, image -> plan: a VLM names the objects worth segmenting."""
