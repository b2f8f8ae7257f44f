"""The `elastune` command line: parse, delegate, render. Nothing imports this package."""
