"""`python -m crlf` (also what `torchrun -m crlf` runs)."""

from crlf.cli import main

if __name__ == "__main__":
    main()
