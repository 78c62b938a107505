"""`python -m vlkit` runs the CLI (used by `accelerate launch -m vlkit` and `torchrun -m vlkit`)."""

from vlkit.cli.app import main

if __name__ == "__main__":
    main()
