"""segserve training package."""
