"""``python -m noisescale`` (also what ``torchrun -m noisescale`` runs)."""

from noisescale.cli.app import main

main()
