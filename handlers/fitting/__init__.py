"""Offline halves of the explanation methods: fits and their reports (never imported by the server)."""
