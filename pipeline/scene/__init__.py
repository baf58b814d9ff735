"""objects -> scene: composition into the camera frame, .ply/.splat files, turntable rendering."""
