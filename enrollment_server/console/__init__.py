"""The web console: its pages (pages.py) and the assets they load (static/), shipped as package data."""
