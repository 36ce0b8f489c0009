"""The tracked steps every entry point runs (prepare, teacher, distill) and the CLI wrapper their commands share (cli)."""
