"""`python -m fusedeploy ...` (and `torchrun -m fusedeploy compress ...`) run the CLI."""

from .cli import main

main()
