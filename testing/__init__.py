"""Test support, not shipped in the wheel: sample PDFs (samples, hostile_inputs), tiny Nougat
checkpoints (tiny_checkpoint), the fake model and the fault points a run takes through its hooks
(fake_model, faults; see nougat_dist/hooks.py), and `make demo` (demo)."""
