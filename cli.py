"""Checkout shim: `python cli.py ...` works like the installed `yolo-compress` command."""
from compress.cli import main

if __name__ == "__main__":
    main()
