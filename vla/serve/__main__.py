"""`python -m vla.serve --policy checkpoints/<run>/last`."""

from vla.serve.cli import main

if __name__ == "__main__":
    main()
