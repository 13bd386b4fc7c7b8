"""`python -m server` runs the same CLI as `gpt4all-j-server`."""

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
