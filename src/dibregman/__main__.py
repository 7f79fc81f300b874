"""``python -m dibregman`` is the ``dibregman`` command."""

from .cli import main

main()
