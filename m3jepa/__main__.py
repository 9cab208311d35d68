"""Entry point for `python -m m3jepa` (and `torchrun -m m3jepa`)."""

from m3jepa.cli import main

if __name__ == "__main__":
    main()
