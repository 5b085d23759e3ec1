"""kalm-mlx benchmarks: speed and memory side by side with sentence-transformers on PyTorch.

    python -m benchmarks [--quick] [--model FOLDER] [--out DIR]

See :mod:`benchmarks.cli` for the options, :mod:`benchmarks.run` for what is measured.
"""
