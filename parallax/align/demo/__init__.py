"""The alignment and safety demo (``python -m parallax.align.demo``); see README.md here."""
