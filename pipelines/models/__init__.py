"""Models: the teacher and student builders and their presets (builders) and the KD Distiller (distiller)."""
