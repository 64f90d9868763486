"""`python -m sam_sparse ...` is `sam-sparse ...` (what `torchrun -m sam_sparse amg ...` starts per process)."""

from .cli import main

if __name__ == "__main__":
    main()
