"""Clients of the pretag server."""
